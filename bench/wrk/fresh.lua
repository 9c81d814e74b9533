-- Fresh transforms: every request differs. $WRK_TEMPLATE is a path in which each "{i}" is
-- replaced by a counter that starts at $WRK_I0 and goes up by one a request (run.py puts it in
-- the requested size, and for uncached sources in the source URL too). wrk keeps one counter
-- per thread, so run this with -t1 to keep every request unique.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local report = dofile(here .. "report.lua")

local template = os.getenv("WRK_TEMPLATE") or "/?i={i}"
local counter = tonumber(os.getenv("WRK_I0") or "0")

function request()
  local path = template:gsub("{i}", tostring(counter))
  counter = counter + 1
  return wrk.format("GET", path)
end

done = report.done
