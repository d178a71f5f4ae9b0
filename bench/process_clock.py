"""The clock the PyTorch references share with kiln for "time to the first step"."""
import os


def since_process_start():
    """Seconds since this process started (interpreter and imports included), as kiln counts."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
