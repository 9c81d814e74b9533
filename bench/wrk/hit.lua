-- Cache hits: every request is the same URL, $WRK_PATH (run.py warms it first).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local report = dofile(here .. "report.lua")

local path = os.getenv("WRK_PATH") or "/"
local req = nil

function request()
  if req == nil then
    req = wrk.format("GET", path)
  end
  return req
end

done = report.done
