-- echo_add: index completions of the served model (`cptd index-echoes`), behind the _echo_index.lua prelude.
-- KEYS: echo_lsh, echo, echo_bands, stats
-- ARGV[1]: most completions kept; ARGV[2..]: pairs of completion key, comma-separated band keys
-- Returns how many were new.
local added = 0
for i = 2, #ARGV, 2 do
  local bands = {}
  for b in string.gmatch(ARGV[i + 1], '[^,]+') do bands[#bands + 1] = b end
  added = added + echo_add(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[i], bands)
end
echo_evict(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]))
return added
