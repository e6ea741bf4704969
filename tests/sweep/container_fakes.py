"""A stand-in ``singularity``/``apptainer``: what this machine cannot have, at the process
boundary. It records its arguments, checks the shape of the call (``exec``, ``--nv``, no flag
that drops the environment, overlays and bind sources that exist, an absolute image file,
a command after it) and runs the command after the image with a PATH on which the SLURM
client programs are missing ("command not found"), as in an image without SLURM."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SLURM_CLIENTS = {
    "sbatch", "scontrol", "squeue", "srun", "scancel", "sacct", "sinfo", "salloc", "sattach",
    "sstat", "sprio", "sshare", "sdiag", "sreport", "sacctmgr", "strigger", "sbcast",
    "scrontab",
}  # fmt: skip

STAND_IN = """#!{python}
import json, os, sys
NAME = os.path.basename(sys.argv[0])
args = sys.argv[1:]

def fail(msg):
    print(f"stand-in {{NAME}}: {{msg}}: {{args}}", file=sys.stderr)
    sys.exit(255)

if not args or args[0] != "exec":
    fail("expected `exec`")
i, flags = 1, []
while i < len(args) and args[i].startswith("-"):
    if args[i] in ("--overlay", "-B", "--bind"):
        if i + 1 >= len(args):
            fail(f"{{args[i]}} without a value")
        flags.append((args[i], args[i + 1]))
        i += 2
    else:
        flags.append((args[i], None))
        i += 1
names = [f for f, _ in flags]
if "--nv" not in names:
    fail("no --nv")
for bad in ("--cleanenv", "-e", "--containall", "-C", "--contain", "-c"):
    if bad in names:
        fail(f"{{bad}} drops the SLURM environment")
for flag, value in flags:
    if flag == "--overlay" and not os.path.isfile(value.removesuffix(":ro").removesuffix(":rw")):
        fail(f"overlay {{value}} does not exist")
    if flag in ("-B", "--bind") and not os.path.exists(value.split(":")[0]):
        fail(f"bind source {{value}} does not exist")
if i >= len(args):
    fail("no image")
image, command = args[i], args[i + 1:]
if not (image.startswith("/") and os.path.isfile(image)):
    fail(f"image {{image}} is not an absolute path of a file")
if not command:
    fail("no command after the image")
array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
job = f"{{array}}_{{task}}" if array else os.environ.get("SLURM_JOB_ID")
record = {{"runtime": NAME, "job": job, "restart": os.environ.get("SLURM_RESTART_COUNT"),
          "flags": flags, "image": image, "command": command}}
fd = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, (json.dumps(record) + "\\n").encode())
os.close(fd)
env = dict(os.environ, PATH={path!r}, DECON_TEST_IN_CONTAINER="1")
os.execvpe(command[0], command, env)
"""


def no_slurm_path(folder: Path, path: str | None = None) -> str:
    """``path`` (default: this PATH) with every folder that holds a SLURM client replaced by a
    mirror of it (symbolic links) without those programs."""
    entries = []
    for n, entry in enumerate((path or os.environ["PATH"]).split(os.pathsep)):
        d = Path(entry)
        if not d.is_dir() or not any((d / name).exists() for name in SLURM_CLIENTS):
            entries.append(entry)
            continue
        mirror = folder / f"path{n}"
        mirror.mkdir(parents=True, exist_ok=True)
        for item in d.iterdir():
            if item.name not in SLURM_CLIENTS and not (mirror / item.name).exists():
                (mirror / item.name).symlink_to(item)
        entries.append(str(mirror))
    return os.pathsep.join(entries)


def write_stand_in(bin_dir: Path, path: str | None = None) -> Path:
    """``singularity`` and ``apptainer`` stand-ins in ``bin_dir``; returns their call log
    (one JSON object a call). ``path``: the PATH they run the command with (default: this
    one without the SLURM clients)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = bin_dir / "container.log"
    log.touch()
    inside = path if path is not None else no_slurm_path(bin_dir / "image-path")
    for name in ("singularity", "apptainer"):
        script = bin_dir / name
        script.write_text(STAND_IN.format(python=sys.executable, log=str(log), path=inside))
        script.chmod(0o755)
    return log


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
