-- The worker classes of bench/remote.lua: a `corral serve` host loads this
-- file, and the client takes the same class from it (issue 13).
local corral = require "corral"
local Echo = corral.worker { echo = function(_, x) return x end }
return { echo = Echo }
