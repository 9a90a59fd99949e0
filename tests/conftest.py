"""Test session set-up: Triton's CPU interpreter must be on before any kernel is defined;
DeepSpeed runs on its CPU accelerator."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GROWTH_DS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))
