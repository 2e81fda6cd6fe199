"""The Lua scripts of the Redis store, and the one reply text it expects from a plain XADD.

Each script touches the keys of one session only (one hash slot on a Cluster); the key
layout they work on is `keys.py`'s, and the event ends they unpack (`<I4`) are
`codec.ends_bytes`'s.
"""

from __future__ import annotations

# Scripts go by EVAL, not EVALSHA: Redis caches them by digest anyway, and a restarted Redis
# (which forgot every loaded script) needs no NOSCRIPT dance.

# Appends are plain XADDs, pipelined: one round trip per primary per loop turn whatever their
# number, and no script to run per batch (the connection packs commands by hand, so a
# command costs the proxy little, and Redis far less than a Lua call). A batch Redis already
# has (a write retried after a lost connection) is refused as "equal or smaller" than the
# stream's top entry: that refusal is the entry ids doing their job, not an error.
DUPLICATE = "equal or smaller"

# A new session's hash, unless the id is another session's (1 written, 0 refused). The same
# metadata again is this process's own create repeated (a claim, then the create), not a
# conflict.
CREATE = """
local existing = redis.call('HGET', KEYS[1], 'meta')
if existing and existing ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'meta', ARGV[1], 'state', 'streaming', 'owner', ARGV[2],
  'events', 0, 'bytes', 0, 'updated_ns', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# The final state and the end marker; repeating it (a retried write) changes nothing.
END = """
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'reason', ARGV[2], 'events', ARGV[3],
  'bytes', ARGV[4], 'updated_ns', ARGV[5], 'first_event_ns', ARGV[6])
local reply = redis.pcall('XADD', KEYS[2], ARGV[3] .. '-1', 'b', ARGV[4], 't', ARGV[5])
if type(reply) == 'table' and reply.err and not string.find(reply.err, 'equal or smaller') then
  return reply
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return 1
"""

# Events ARGV[1].. of a stream, cut server-side to whole events within ARGV[2] bytes (at least
# one), by the rule of `tail.take_events`: the reply is the bytes and the count, not the
# entries, so a replay costs Redis a few string copies and costs the proxy nothing per event.
READ = """
local expected, budget = tonumber(ARGV[1]), tonumber(ARGV[2])
local parts, total, count = {}, 0, 0
local cursor = ARGV[1]
while true do
  local entries = redis.call('XRANGE', KEYS[1], cursor, '+', 'COUNT', 64)
  for _, entry in ipairs(entries) do
    local f, d, e = entry[2], nil, nil
    for j = 1, #f, 2 do
      if f[j] == 'd' then d = f[j + 1] elseif f[j] == 'e' then e = f[j + 1] end
    end
    if d then
      local n = #e / 4
      local first = tonumber(string.match(entry[1], '^%d+')) - n + 1
      if first > expected then return {table.concat(parts), count} end
      local skip = expected - first
      local begin = 0
      if skip > 0 then begin = struct.unpack('<I4', e, 4 * (skip - 1) + 1) end
      local stop, finish = n, #d
      if finish - begin > budget - total then
        stop, finish = skip, begin
        while stop < n do
          local at = struct.unpack('<I4', e, 4 * stop + 1)
          if at - begin > budget - total and count + stop - skip > 0 then break end
          stop, finish = stop + 1, at
        end
      end
      parts[#parts + 1] = string.sub(d, begin + 1, finish)
      total, count, expected = total + finish - begin, count + stop - skip, expected + stop - skip
      if stop < n then return {table.concat(parts), count} end
    end
  end
  if #entries < 64 then return {table.concat(parts), count} end
  cursor = '(' .. entries[#entries][1]
end
"""

# Ends a session whose owner stopped heartbeating (the caller saw its heartbeat gone), if
# nothing changed since: still streaming, same owner. The event count is the stream's, so
# events written just before the owner died are counted even if its metadata lags.
INTERRUPT = """
if redis.call('HGET', KEYS[1], 'state') ~= 'streaming' then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local events, bytes = '0', '0'
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last > 0 then
  events = string.match(last[1][1], '^%d+')
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'b' then bytes = fields[i + 1] end
  end
end
redis.call('HSET', KEYS[1], 'state', 'interrupted', 'reason', ARGV[2], 'events', events,
  'bytes', bytes, 'updated_ns', ARGV[3])
redis.call('XADD', KEYS[2], events .. '-1', 'b', bytes, 't', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""
