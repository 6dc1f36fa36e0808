# Sourced by the launch scripts that run mtjax in the background to pass signals on to it.
# wait_for PID: wait until PID ends and set `code` to its exit code. Over 128, `wait` was
# interrupted by a trapped signal (128+signal), or PID itself ended by a signal or with such a
# code (137 after the OOM killer, 130 after Ctrl-C): wait again while PID runs, then once more
# after it ended, for the code bash kept. (Asking `kill -0` alone lost the exit code when PID
# ended between the two: 143 instead of mtjax's 42, 6 times in 30. Waiting until `wait`
# answered 127 never ended: bash 5.2 answers an ended PID's kept code at every wait.)
wait_for() {
  code=0
  wait "$1" || code=$?
  local again last=0
  while (( code > 128 && ! last )); do
    kill -0 "$1" 2>/dev/null || last=1
    again=0
    wait "$1" 2>/dev/null || again=$?
    (( again == 127 )) && break  # its code was reported already: the one we hold
    code=$again
  done
}
