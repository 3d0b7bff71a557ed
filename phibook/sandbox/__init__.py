"""The code jail: model-written programs run in bubblewrap with seccomp and rlimits, and their
verdicts are decided in a second jailed process that no program code ever runs in.

runner (the API: run_python, check_program, check_many, capabilities), jail (the bwrap command
line and the seccomp filter), launcher (the script that runs inside the jail, in the program's
or the harness's mode; a file, never imported by phibook). Used by phibook.eval's code tasks;
it depends on nothing of phibook but errors.
"""
