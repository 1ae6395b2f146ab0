#!/bin/sh
# Starts redis-server with a maxmemory derived from this container's memory
# limit and with its passwords read from a file, never from a command line.
#
# maxmemory. `maxmemory-policy noeviction` (redis.conf) only acts once Redis
# knows a maxmemory. Without one Redis grows until the kernel OOM-kills the pod
# at its limit, and a killed Redis loses its last unsynced second of writes.
# With one, a full Redis refuses writes (OOM errors), which cptd turns into
# back-pressure. The limit comes from the downward API (env REDIS_MEMORY_LIMIT,
# bytes, set from resources.limits.memory in redis.yaml), so maxmemory follows
# any change of the limit and the two cannot drift (a container without a
# memory limit gets the node's allocatable memory there: set a limit).
# REDIS_MAXMEMORY_PERCENT of it (75 by default) leaves room for what Redis uses
# outside its dataset: allocator fragmentation, client buffers, and the
# copy-on-write pages of the forked child that rewrites the AOF or writes the
# RDB snapshot.
#
# Passwords. `ps` on the node shows every process's arguments to anyone, so
# no password is passed as one: this script writes `requirepass` (the default
# user: operators, the readiness probe) and cptd's ACL user with its password
# into /run/redis/secrets.conf (a memory volume; umask 077: only Redis's user
# reads it), drops every password from its environment and execs redis-server,
# which includes that file. Passwords must be single words without quotes.
#
# Arguments: cptd's ACL rules (not secret), e.g. resetkeys ~cptd:{default}:* -@all +ping ...
set -eu
limit="${REDIS_MEMORY_LIMIT:?REDIS_MEMORY_LIMIT (the container memory limit from the downward API) is not set}"
percent="${REDIS_MAXMEMORY_PERCENT:-75}"
case "$limit$percent" in
  *[!0-9]*) echo "redis-start.sh: REDIS_MEMORY_LIMIT=$limit and REDIS_MAXMEMORY_PERCENT=$percent must be whole numbers" >&2; exit 2 ;;
esac
if [ "$percent" -lt 10 ] || [ "$percent" -gt 90 ]; then
  echo "redis-start.sh: REDIS_MAXMEMORY_PERCENT=$percent is outside 10..90" >&2
  exit 2
fi
maxmemory=$((limit / 100 * percent))
: "${REDIS_PASSWORD:?REDIS_PASSWORD (the default user's password, from the Secret) is not set}"
: "${CPTD_REDIS_PASSWORD:?CPTD_REDIS_PASSWORD (user cptd's password, from the Secret) is not set}"
umask 077
{
  printf 'requirepass %s\n' "$REDIS_PASSWORD"
  printf 'user cptd on >%s' "$CPTD_REDIS_PASSWORD"
  printf ' %s' "$@"
  printf '\n'
} > /run/redis/secrets.conf
# REDISCLI_AUTH holds REDIS_PASSWORD for the readiness probe, which gets the
# container's env from the kubelet, not from this process: drop it here too.
unset REDIS_PASSWORD CPTD_REDIS_PASSWORD REDISCLI_AUTH
echo "redis-start.sh: memory limit $limit bytes, maxmemory $maxmemory bytes ($percent%)" >&2
exec redis-server /etc/redis/redis.conf --include /run/redis/secrets.conf --maxmemory "$maxmemory"
