# Sourced by the bench scripts.
# A Python that starts fast for the scripts' JSON parsing: the system's. A pyenv shim first in
# PATH costs about 90 ms of CPU per call, and a loop polling backup_get every 100 ms with it took
# half a core from the engine it was measuring.
if [ -x /usr/bin/python3 ]; then py=/usr/bin/python3; else py=python3; fi
