-- conf.lua: a window by default; none with CORRAL_LOVE_HEADLESS=1 (LÖVE 11
-- then starts without a display: no window, graphics or audio modules).
-- luacheck: globals love
function love.conf(t)
  t.identity = "corral-demo"
  t.window.title = "corral in LÖVE"
  if os.getenv("CORRAL_LOVE_HEADLESS") == "1" then
    t.window = false
    t.modules.window = false
    t.modules.graphics = false
    t.modules.audio = false
    t.modules.sound = false
    t.modules.joystick = false
  end
end
