-- What each wrk thread owns: one connection, and one line of a file (a token chain, a user).
-- Scripts call number_threads() as their setup and own_line(path) in their init.
local M = {}
local counter = 0

function M.number_threads(thread)
  counter = counter + 1
  thread:set("index", counter)
end

function M.own_line(path)
  local n = 0
  local found
  for line in io.lines(path) do
    n = n + 1
    if n == index then found = line end
  end
  return found
end

return M
