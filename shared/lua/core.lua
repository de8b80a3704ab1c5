-- sse-gateway: the publish and resume-read logic that runs inside Redis.
-- The settings (MAXLEN, TTL_SECONDS, MAX_DATA_BYTES, SHARDED) are prepended by whoever loads this file:
-- the gateway at start-up (FUNCTION LOAD REPLACE) or lua/publish.lua for EVAL.
-- Keys and channels carry the topic as a Redis Cluster hash tag, so the key argument (the topic
-- or its stream key) hashes to the same slot as every key built from it.

local function err(msg)
  return redis.error_reply('ERR ssegw: ' .. msg)
end

local function check_topic(topic)
  if type(topic) ~= 'string' or #topic == 0 or #topic > 128 or string.find(topic, '[^%w%-_%.:/@]') then
    return err('invalid topic (1 to 128 bytes of ASCII letters, digits and - _ . : / @)')
  end
end

local function stream_key(topic)
  return 'ssegw:s:{' .. topic .. '}'
end

-- The single key of a call is the topic's stream key (`ssegw:s:{topic}`), or the topic itself.
-- Both route to the topic's slot, but only the stream key is a real key: while Redis Cluster
-- migrates the slot, it sends a call to the node that holds its declared key, so only a call
-- that declares the stream key runs where the stream is.
local function topic_of(key)
  return string.match(key, '^ssegw:s:{(.*)}$') or key
end

local function parse_id(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local function cmp_id(a, b)
  local am, as = parse_id(a)
  local bm, bs = parse_id(b)
  if am ~= bm then return am < bm and -1 or 1 end
  if as ~= bs then return as < bs and -1 or 1 end
  return 0
end

-- publish(topic; data, event?, traceparent?) -> id
-- Appends the event to the topic's stream (trimmed to MAXLEN, expiring after TTL_SECONDS without
-- publishes) and publishes it on the topic's channel, atomically. A W3C traceparent, when given,
-- travels with the event so that deliveries can be traced back to the publish.
local function publish(keys, args)
  local topic, data, event, traceparent = topic_of(keys[1]), args[1], args[2], args[3]
  local bad = check_topic(topic)
  if bad then return bad end
  if data == nil or #data == 0 then
    return err('data must not be empty (browsers do not dispatch events without data)')
  end
  if #data > MAX_DATA_BYTES then
    return err('data is larger than ' .. MAX_DATA_BYTES .. ' bytes')
  end
  if event == '' then event = nil end
  if event ~= nil and (#event > 64 or string.find(event, '[^%w%-_%.:]') or string.sub(event, 1, 5) == 'ssegw') then
    return err('invalid event type (1 to 64 bytes of ASCII letters, digits and - _ . :, not starting with ssegw)')
  end
  if traceparent == '' then traceparent = nil end
  if traceparent ~= nil and (#traceparent ~= 55
      or not string.find(traceparent, '^00%-[0-9a-f]+%-[0-9a-f]+%-[0-9a-f][0-9a-f]$')
      or string.sub(traceparent, 36, 36) ~= '-'
      or string.sub(traceparent, 4, 35) == string.rep('0', 32)
      or string.sub(traceparent, 37, 52) == string.rep('0', 16)) then
    return err('invalid traceparent (00-<32 hex trace id>-<16 hex span id>-<2 hex flags>, lower-case)')
  end
  local key = stream_key(topic)
  -- XADD's own trimming leaves max-deleted-entry-id alone, and resume reads need it to tell a
  -- trimmed position from a current one: find the newest entry this publish trims and record it.
  local len = redis.call('XLEN', key)
  local newest_trimmed = nil
  if len >= MAXLEN then
    local trimmed = redis.call('XRANGE', key, '-', '+', 'COUNT', len - MAXLEN + 1)
    newest_trimmed = trimmed[#trimmed][1]
  end
  -- A new stream (possibly replacing one that was deleted, expired or lost) starts after the
  -- current millisecond, so its ids are greater than any id of an earlier incarnation and a
  -- position from that earlier history is always recognised as lost, never taken for current.
  local next_id = '*'
  if len == 0 and redis.call('EXISTS', key) == 0 then
    local now = redis.call('TIME')
    next_id = (tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + 1) .. '-0'
  end
  local fields = {'d', data}
  if event then
    table.insert(fields, 'e')
    table.insert(fields, event)
  end
  if traceparent then
    table.insert(fields, 't')
    table.insert(fields, traceparent)
  end
  local id = redis.call('XADD', key, 'MAXLEN', MAXLEN, next_id, unpack(fields))
  if newest_trimmed then
    redis.call('XSETID', key, id, 'MAXDELETEDID', newest_trimmed)
  end
  redis.call('EXPIRE', key, TTL_SECONDS)
  local header = 'i' .. id .. '\n'
  if event then header = header .. 'e' .. event .. '\n' end
  if traceparent then header = header .. 't' .. traceparent .. '\n' end
  -- In a cluster, a sharded channel keeps the event within its topic's shard (the channel
  -- hashes to the topic's slot); a global one would cross the whole cluster's bus.
  if SHARDED then
    redis.call('SPUBLISH', 'ssegw:c:{' .. topic .. '}', header .. '\n' .. data)
  else
    redis.call('PUBLISH', 'ssegw:c:{' .. topic .. '}', header .. '\n' .. data)
  end
  return id
end

-- read(topic; after, count) -> {status, last_generated_id, entries}
-- status is 'ok', or 'trimmed' / 'lost' when events after `after` are no longer retained; then
-- the entries start at the oldest retained event. `after` = '' reads from the oldest event.
local function read(keys, args)
  local topic, after, count = topic_of(keys[1]), args[1], tonumber(args[2])
  local bad = check_topic(topic)
  if bad then return bad end
  if after == nil or (after ~= '' and not parse_id(after)) or not count or count < 0 then
    return err('usage: FCALL ssegw_read 1 <topic> <after-id or empty> <count>')
  end
  local key = stream_key(topic)
  if redis.call('EXISTS', key) == 0 then
    if after == '' or after == '0-0' then return {'ok', '0-0', {}} end
    return {'lost', '0-0', {}}
  end
  local last, max_deleted, first = '0-0', '0-0', nil
  local info = redis.call('XINFO', 'STREAM', key)
  for i = 1, #info, 2 do
    local field = info[i]
    if field == 'last-generated-id' then last = info[i + 1]
    elseif field == 'max-deleted-entry-id' then max_deleted = info[i + 1]
    elseif field == 'first-entry' then first = info[i + 1]
    end
  end
  local status = 'ok'
  if after ~= '' then
    if cmp_id(after, max_deleted) < 0 then
      status = 'trimmed'
    elseif cmp_id(after, last) > 0 then
      status = 'lost'
    elseif max_deleted == '0-0' and after ~= '0-0' and first and cmp_id(after, first[1]) < 0 then
      -- Nothing was ever trimmed, yet the position predates the first entry: it belongs to an
      -- earlier incarnation of the stream (deleted, expired, or lost in a Redis restart).
      status = 'lost'
    end
  end
  -- A position inside the retained range must be an event of this history (or the newest
  -- trimmed one, or 0-0). One that is not was issued by another incarnation: a primary that
  -- acknowledged events and died before its replica had them, whose promoted replica then
  -- appended events of its own past them. Reading from it would skip those silently. The
  -- read starts at the position itself, so checking it costs no extra call.
  if status == 'ok' and after ~= '' and after ~= '0-0' and after ~= max_deleted then
    local from = redis.call('XRANGE', key, after, '+', 'COUNT', count + 1)
    if #from > 0 and (from[1][1] == after or cmp_id(from[1][1], after) == 0) then
      table.remove(from, 1)
      return {status, last, from}
    end
    status = 'lost'
  end
  local start = '-'
  if after ~= '' and status == 'ok' then start = '(' .. after end
  local entries = {}
  if count > 0 then
    entries = redis.call('XRANGE', key, start, '+', 'COUNT', count)
  end
  return {status, last, entries}
end
