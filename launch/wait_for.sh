# Sourced by the launch scripts that run mtjax in the background to pass signals on to it.
# wait_for PID: wait until PID ends and set `code` to its exit code. A trapped signal interrupts
# `wait` (it returns 128+signal), so wait again while the process is still there.
wait_for() {
  code=0
  wait "$1" || code=$?
  while kill -0 "$1" 2>/dev/null; do
    code=0
    wait "$1" || code=$?
  done
}
