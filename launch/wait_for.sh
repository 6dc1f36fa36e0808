# Sourced by the launch scripts that run mtjax in the background to pass signals on to it.
# wait_for PID: wait until PID ends and set `code` to its exit code. A trapped signal interrupts
# `wait` (it returns 128+signal), so wait again: until `wait` answers 127, the PID is no longer
# a child to wait for, and the code before that was the exit code. (Asking `kill -0` whether
# it still ran lost the exit code when it ended between the two: 143 instead of mtjax's 42,
# 6 times in 30.)
wait_for() {
  code=0
  wait "$1" || code=$?
  local again
  while (( code > 128 )); do
    again=0
    wait "$1" 2>/dev/null || again=$?
    (( again == 127 )) && break
    code=$again
  done
}
