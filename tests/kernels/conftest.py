import os

# The Triton interpreter must be chosen before triton is imported anywhere in the test session.
os.environ.setdefault("TRITON_INTERPRET", "1")
