-- GET with a bearer token of its own per wrk thread (one connection each): each connection is
-- another session, as distinct clients are.
local own = require("own")

setup = own.number_threads

function init(args)
  wrk.headers["Authorization"] = "Bearer " .. own.own_line(os.getenv("AUTHGATE_BENCH_TOKENS"))
end
