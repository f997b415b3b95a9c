std = "luajit"
max_line_length = 110
files["tests/spec/"] = { std = "+busted" }
files["tests/output.lua"] = { std = "+busted" }
files["bench/tarantool_fibers.lua"] = { globals = { "arg" } }
exclude_files = { "build/", "obj/" }
