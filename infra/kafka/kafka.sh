#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft, combined broker + controller) for local use and tests,
# run straight from the Kafka jars: no Docker, no tarball.
#
#   infra/kafka/kafka.sh fetch    jars into infra/kafka/.dist/libs (Maven), or use $KAFKA_HOME/libs
#   infra/kafka/kafka.sh up       start the broker in the background (idempotent), wait until ready
#   infra/kafka/kafka.sh down     stop it (SIGTERM, then SIGKILL after 30 s)
#   infra/kafka/kafka.sh status   "kafka: up (...)" and exit 0, or "kafka: down" and exit 1
#   infra/kafka/kafka.sh reset    down, then delete all broker state (clean slate)
#
# State lives in $GRIDLOOP_VAR_DIR/kafka (default: var/kafka at the repository root):
#   data/  broker.log  broker.pid  server.properties (generated)  cluster.id
#
# Environment:
#   GRIDLOOP_VAR_DIR          runtime state root (default <repo>/var)
#   KAFKA_HOME            an unpacked Apache Kafka distribution: use $KAFKA_HOME/libs, skip Maven
#   KAFKA_PORT            client port on 127.0.0.1 (default 9092); the controller uses KAFKA_PORT+1
#   KAFKA_CONTROLLER_PORT controller port (default KAFKA_PORT+1)
#   KAFKA_SASL_USERS      a file of `user=password` lines: run the broker with SASL and ACLs instead of plain
#                         PLAINTEXT (see "SASL mode" below)
#   KAFKA_SUPER_USERS     in SASL mode, the users allowed everything, `;`-separated (default "admin")
#   KAFKA_HEAP_OPTS       JVM heap (default "-Xms256m -Xmx768m")
#   KAFKA_OPTS            extra JVM options
#   KAFKA_START_TIMEOUT   seconds to wait for the broker to come up (default 90)
#   KAFKA_STOP_TIMEOUT    seconds to wait after SIGTERM before SIGKILL (default 30)
#   JAVA_HOME             Java 17+ to use (default: java on PATH)
#
# SASL mode (KAFKA_SASL_USERS set): both listeners ask for SASL/PLAIN credentials, the users being those of the
# file; the broker talks to its own controller as the user `broker` (its password generated into the state
# directory); the StandardAuthorizer allows nothing that no ACL allows (allow.everyone.if.no.acl.found=false),
# except to `broker` and the super users. `python -m services.admin acls apply` grants each service its topics
# and consumer group. Without KAFKA_SASL_USERS the broker trusts anyone who reaches 127.0.0.1:$KAFKA_PORT.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

VAR_ROOT="${GRIDLOOP_VAR_DIR:-$ROOT/var}"
case "$VAR_ROOT" in
  /*) ;;
  *) VAR_ROOT="$PWD/$VAR_ROOT" ;;
esac
STATE="$VAR_ROOT/kafka"
DATA="$STATE/data"
LOG="$STATE/broker.log"
PIDFILE="$STATE/broker.pid"
PROPS="$STATE/server.properties"
CLUSTER_ID_FILE="$STATE/cluster.id"
BROKER_SECRET_FILE="$STATE/broker.secret"
LOCKFILE="$STATE/.lock"

HOST=127.0.0.1
PORT="${KAFKA_PORT:-9092}"
CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((PORT + 1))}"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}"
SASL_USERS="${KAFKA_SASL_USERS:-}"
SUPER_USERS="${KAFKA_SUPER_USERS:-admin}"

SOURCE_PROPS="$HERE/server.properties"
LOG4J_CONF="$HERE/log4j2.properties"
POM="$HERE/pom.xml"
DIST_LIBS="$HERE/.dist/libs"

die() {
  printf 'kafka: %s\n' "$*" >&2
  exit 1
}

say() {
  printf 'kafka: %s\n' "$*"
}

java_bin() {
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    printf '%s\n' "$JAVA_HOME/bin/java"
  elif command -v java >/dev/null 2>&1; then
    command -v java
  else
    die "java not found: install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
  fi
}

check_java() {
  local java version major
  java="$(java_bin)"
  version="$("$java" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)"
  major="${version%%.*}"
  if [[ "$major" == 1 ]]; then
    major="$(cut -d. -f2 <<<"$version")"
  fi
  if [[ "$major" =~ ^[0-9]+$ ]] && ((major < 17)); then
    die "Apache Kafka 4 needs Java 17 or newer, found $version ($java)"
  fi
}

libs_dir() {
  if [[ -n "${KAFKA_HOME:-}" ]]; then
    printf '%s\n' "$KAFKA_HOME/libs"
  else
    printf '%s\n' "$DIST_LIBS"
  fi
}

classpath() {
  printf '%s/*\n' "$(libs_dir)"
}

have_broker_jar() {
  compgen -G "$1/kafka_2.13-*.jar" >/dev/null 2>&1
}

cmd_fetch() {
  if [[ -n "${KAFKA_HOME:-}" ]]; then
    have_broker_jar "$KAFKA_HOME/libs" \
      || die "KAFKA_HOME=$KAFKA_HOME has no libs/kafka_2.13-*.jar: point it at an unpacked Apache Kafka distribution"
    say "using jars from $KAFKA_HOME/libs"
    return 0
  fi
  if have_broker_jar "$DIST_LIBS"; then
    return 0
  fi
  command -v mvn >/dev/null 2>&1 \
    || die "mvn not found: install Maven (Debian: apt-get install maven), or set KAFKA_HOME to an unpacked Apache Kafka distribution"
  say "fetching Apache Kafka jars from Maven Central into ${DIST_LIBS#"$ROOT"/}"
  mvn -q -B -f "$POM" dependency:copy-dependencies
  have_broker_jar "$DIST_LIBS" || die "Maven finished but $DIST_LIBS has no kafka_2.13-*.jar"
}

# A process is alive if it exists and is not a zombie waiting to be reaped.
alive() {
  local stat
  kill -0 "$1" 2>/dev/null || return 1
  stat="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
  [[ "$stat" != Z* ]]
}

# The pid of a running broker that uses our generated server.properties, if any.
pid_is_our_broker() {
  local pid="$1" args
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  alive "$pid" || return 1
  args="$(ps -ww -o args= -p "$pid" 2>/dev/null)" || return 1
  [[ "$args" == *java* && "$args" == *kafka.Kafka* ]]
}

# Every broker process started with our generated properties file (pid file or not).
find_our_brokers() {
  local pid args
  for pid in $(pgrep -f 'kafka\.Kafka' 2>/dev/null || true); do
    args="$(ps -ww -o args= -p "$pid" 2>/dev/null)" || continue
    if [[ "$args" == *java* && "$args" == *"kafka.Kafka $PROPS"* ]]; then
      printf '%s\n' "$pid"
    fi
  done
}

# The broker's pid: from the pid file, else a stray broker running with our properties.
current_pid() {
  local pid=""
  if [[ -f "$PIDFILE" ]]; then
    pid="$(tr -dc '0-9' <"$PIDFILE")"
    if pid_is_our_broker "$pid"; then
      printf '%s\n' "$pid"
      return 0
    fi
  fi
  pid="$(find_our_brokers | head -n 1)"
  if [[ -n "$pid" ]]; then
    printf '%s\n' "$pid"
    return 0
  fi
  return 1
}

port_open() {
  local host="$1" port="$2"
  # shellcheck disable=SC2016 # expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" >/dev/null 2>&1
}

broker_started_in_log() {
  [[ -f "$LOG" ]] && grep -Eq 'BrokerServer id=[0-9]+\] Transition from STARTING to STARTED' "$LOG"
}

kafka_version() {
  local v=""
  if [[ -f "$LOG" ]]; then
    v="$(grep -m 1 -o 'Kafka version: [^ ]*' "$LOG" | sed 's/^Kafka version: //')" || true
  fi
  printf '%s\n' "${v:-unknown}"
}

# The JAAS `user_<name>="<password>"` entries of the SASL users file (`user=password` lines, # comments).
sasl_user_entries() {
  local line user password entries=""
  [[ -r "$SASL_USERS" ]] || die "KAFKA_SASL_USERS=$SASL_USERS is not a readable file"
  while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line%%#*}"
    line="$(sed 's/^[[:space:]]*//; s/[[:space:]]*$//' <<<"$line")"
    [[ -n "$line" ]] || continue
    [[ "$line" == *=* ]] || die "$SASL_USERS: not a user=password line: $line"
    user="${line%%=*}"
    password="${line#*=}"
    [[ "$user" =~ ^[A-Za-z0-9_.-]+$ ]] || die "$SASL_USERS: bad user name '$user' (letters, digits, _ . -)"
    [[ "$user" != broker ]] || die "$SASL_USERS: 'broker' is the broker's own user, generated by kafka.sh"
    [[ -n "$password" && "$password" != *[\"\\[:space:]]* ]] \
      || die "$SASL_USERS: user $user: empty password, or one with a quote, backslash or space"
    entries+=" user_$user=\"$password\""
  done <"$SASL_USERS"
  [[ -n "$entries" ]] || die "$SASL_USERS defines no user"
  printf '%s\n' "$entries"
}

# The password the broker uses to reach its own controller, made once per state directory.
broker_secret() {
  if [[ ! -s "$BROKER_SECRET_FILE" ]]; then
    (umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$BROKER_SECRET_FILE")
  fi
  cat "$BROKER_SECRET_FILE"
}

write_sasl_properties() {
  local users secret login super="User:broker" user
  local -a names
  users="$(sasl_user_entries)"
  secret="$(broker_secret)"
  login="org.apache.kafka.common.security.plain.PlainLoginModule required username=\"broker\" password=\"$secret\" user_broker=\"$secret\""
  IFS=';' read -r -a names <<<"$SUPER_USERS"
  for user in "${names[@]}"; do
    user="${user// /}"
    [[ -n "$user" ]] && super+=";User:${user#User:}"
  done
  printf '\n# SASL mode (KAFKA_SASL_USERS=%s): credentials on every listener, ACLs on everything.\n' "$SASL_USERS"
  printf 'listeners=SASL_PLAINTEXT://%s:%s,CONTROLLER://%s:%s\n' "$HOST" "$PORT" "$HOST" "$CONTROLLER_PORT"
  printf 'advertised.listeners=SASL_PLAINTEXT://%s:%s\n' "$HOST" "$PORT"
  printf 'controller.quorum.voters=1@%s:%s\n' "$HOST" "$CONTROLLER_PORT"
  printf 'listener.security.protocol.map=CONTROLLER:SASL_PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT\n'
  printf 'inter.broker.listener.name=SASL_PLAINTEXT\n'
  printf 'sasl.enabled.mechanisms=PLAIN\n'
  printf 'sasl.mechanism.inter.broker.protocol=PLAIN\n'
  printf 'sasl.mechanism.controller.protocol=PLAIN\n'
  printf 'listener.name.sasl_plaintext.plain.sasl.jaas.config=%s%s;\n' "$login" "$users"
  printf 'listener.name.controller.plain.sasl.jaas.config=%s;\n' "$login"
  printf 'authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer\n'
  printf 'allow.everyone.if.no.acl.found=false\n'
  printf 'super.users=%s\n' "$super"
}

write_properties() {
  mkdir -p "$STATE" "$DATA"
  (
    umask 077 # in SASL mode the file holds passwords
    {
      cat "$SOURCE_PROPS"
      printf '\n\n# ---- generated by infra/kafka/kafka.sh from %s; do not edit ----\n' "${SOURCE_PROPS#"$ROOT"/}"
      printf 'log.dirs=%s\n' "$DATA"
      if [[ -n "$SASL_USERS" ]]; then
        write_sasl_properties
      elif [[ "$PORT" != 9092 || "$CONTROLLER_PORT" != 9093 ]]; then
        printf 'listeners=PLAINTEXT://%s:%s,CONTROLLER://%s:%s\n' "$HOST" "$PORT" "$HOST" "$CONTROLLER_PORT"
        printf 'advertised.listeners=PLAINTEXT://%s:%s\n' "$HOST" "$PORT"
        printf 'controller.quorum.voters=1@%s:%s\n' "$HOST" "$CONTROLLER_PORT"
      fi
    } >"$PROPS.tmp"
  )
  mv -f "$PROPS.tmp" "$PROPS"
}

format_storage() {
  local java cp cluster_id out
  [[ -f "$DATA/meta.properties" ]] && return 0
  java="$(java_bin)"
  cp="$(classpath)"
  if [[ -s "$CLUSTER_ID_FILE" ]]; then
    cluster_id="$(tr -d '[:space:]' <"$CLUSTER_ID_FILE")"
  else
    cluster_id="$("$java" -Dlog4j2.configurationFile="$LOG4J_CONF" -cp "$cp" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1 | tr -d '[:space:]')"
    [[ -n "$cluster_id" ]] || die "could not generate a cluster id (kafka.tools.StorageTool random-uuid)"
    printf '%s\n' "$cluster_id" >"$CLUSTER_ID_FILE"
  fi
  say "formatting storage in ${DATA#"$ROOT"/} (cluster id $cluster_id)"
  if ! out="$("$java" -Dlog4j2.configurationFile="$LOG4J_CONF" -cp "$cp" \
    kafka.tools.StorageTool format -t "$cluster_id" -c "$PROPS" --ignore-formatted 2>&1)"; then
    printf '%s\n' "$out" >&2
    die "formatting storage failed"
  fi
}

kill_and_wait() {
  local pid="$1" waited=0
  kill -TERM "$pid" 2>/dev/null || return 0
  while alive "$pid"; do
    if ((waited >= STOP_TIMEOUT * 2)); then
      say "pid $pid still running after ${STOP_TIMEOUT}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.5
    waited=$((waited + 1))
  done
}

# Wait until the broker logged STARTED and the client port accepts connections.
wait_ready() {
  local pid="$1" deadline=$((SECONDS + START_TIMEOUT))
  while ((SECONDS < deadline)); do
    if ! alive "$pid"; then
      say "broker process $pid exited during startup; last 40 lines of ${LOG#"$ROOT"/}:" >&2
      tail -n 40 "$LOG" >&2 || true
      return 2
    fi
    if broker_started_in_log && port_open "$HOST" "$PORT"; then
      return 0
    fi
    sleep 0.5
  done
  return 1
}

start_broker() {
  local java cp pid rc
  local -a heap_opts extra_opts
  check_java
  if port_open "$HOST" "$PORT"; then
    die "$HOST:$PORT is already in use by a process that is not this broker (${PIDFILE#"$ROOT"/}); stop it or set KAFKA_PORT"
  fi
  cmd_fetch
  write_properties
  format_storage

  java="$(java_bin)"
  cp="$(classpath)"
  read -r -a heap_opts <<<"$HEAP_OPTS"
  read -r -a extra_opts <<<"${KAFKA_OPTS:-}"

  [[ -f "$LOG" ]] && mv -f "$LOG" "$LOG.1"
  # Detached from this terminal: own session, no stdin, output to the log, lock fd closed.
  setsid nohup "$java" "${heap_opts[@]}" \
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExplicitGCInvokesConcurrent \
    -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$LOG4J_CONF" \
    "${extra_opts[@]}" \
    -cp "$cp" kafka.Kafka "$PROPS" \
    </dev/null >"$LOG" 2>&1 9>&- &
  pid=$!
  # setsid forks when it happens to lead a process group: then $! is gone and the broker
  # is found by its command line.
  sleep 0.3
  if ! alive "$pid"; then
    pid="$(find_our_brokers | head -n 1)"
    pid="${pid:-$!}"
  fi
  printf '%s\n' "$pid" >"$PIDFILE"

  rc=0
  wait_ready "$pid" || rc=$?
  if ((rc != 0)); then
    if ((rc == 1)); then
      say "broker not ready on $HOST:$PORT after ${START_TIMEOUT}s; last 40 lines of ${LOG#"$ROOT"/}:" >&2
      tail -n 40 "$LOG" >&2 || true
    fi
    kill_and_wait "$pid"
    rm -f "$PIDFILE"
    exit 1
  fi
  say "up on $HOST:$PORT (Apache Kafka $(kafka_version), pid $pid)"
}

with_lock() {
  mkdir -p "$STATE"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$LOCKFILE"
    flock -w 180 9 || die "another kafka.sh is busy (lock $LOCKFILE)"
  fi
  "$@"
}

cmd_up() {
  local pid rc
  if pid="$(current_pid)"; then
    if port_open "$HOST" "$PORT"; then
      printf '%s\n' "$pid" >"$PIDFILE"
      say "already up (pid $pid)"
      return 0
    fi
    # Alive but not answering: maybe still starting. Give it the usual time, else replace it.
    say "pid $pid is running but $HOST:$PORT does not answer yet; waiting"
    rc=0
    wait_ready "$pid" || rc=$?
    if ((rc == 0)); then
      printf '%s\n' "$pid" >"$PIDFILE"
      say "already up (pid $pid)"
      return 0
    fi
    say "pid $pid never became ready; restarting"
    kill_and_wait "$pid"
    rm -f "$PIDFILE"
  fi
  start_broker
}

cmd_down() {
  local pid
  local -a pids=()
  if [[ -f "$PIDFILE" ]]; then
    pid="$(tr -dc '0-9' <"$PIDFILE")"
    if pid_is_our_broker "$pid"; then
      pids+=("$pid")
    fi
  fi
  while read -r pid; do
    [[ -n "$pid" ]] || continue
    [[ " ${pids[*]:-} " == *" $pid "* ]] || pids+=("$pid")
  done < <(find_our_brokers)
  for pid in "${pids[@]}"; do
    say "stopping pid $pid"
    kill_and_wait "$pid"
  done
  rm -f "$PIDFILE"
  say "down"
}

cmd_status() {
  local pid
  if pid="$(current_pid)" && port_open "$HOST" "$PORT"; then
    say "up (pid $pid, Apache Kafka $(kafka_version), $HOST:$PORT)"
    return 0
  fi
  if [[ -n "${pid:-}" ]]; then
    say "down (pid $pid is running but $HOST:$PORT does not answer)"
  else
    say "down"
  fi
  return 1
}

cmd_reset() {
  cmd_down
  rm -rf "$STATE"
  say "state removed (${STATE#"$ROOT"/})"
}

usage() {
  # The comment block at the top of this file.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

main() {
  local cmd="${1:-}"
  case "$cmd" in
    fetch) check_java && cmd_fetch && say "classpath $(classpath)" ;;
    up) with_lock cmd_up ;;
    down) with_lock cmd_down ;;
    status) cmd_status ;;
    reset) with_lock cmd_reset ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
