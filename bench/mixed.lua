-- One request in ten asks for /slow (SLOW_MS of CPU in the worker): uneven work.
local counter = 0
request = function()
  counter = counter + 1
  if counter % 10 == 0 then
    return wrk.format("GET", "/slow")
  end
  return wrk.format("GET", "/")
end
