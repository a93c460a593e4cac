"""Every image the KubeRay manifests name is built by a Dockerfile in deploy/docker, on the
expected base, and installs what its pods run.

No Docker engine here: the Dockerfiles are parsed. The mapping image -> Dockerfile is each
Dockerfile's `LABEL org.opencontainers.image.ref.name="<name>:<tag>"` (deploy/docker/README.md).
What a pod runs: the top package of `python -m X` (container command, RayJob entrypoint), of each
Serve app's `import_path`, and what the scenario config it is given selects (`rollout.engine=vllm`
-> vllm, `model.attn_implementation=flash_attention_2` -> flash_attn). What an image provides: its
base's packages plus every `pip install` line (ARG defaults substituted), a local path install of
this repository standing for its packages, its dependencies and the named extras.

The last tests break the real files in memory and check that the checker notices.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from packaging.requirements import Requirement

from deepeyes.config import REPO_ROOT, load_config

DOCKER = REPO_ROOT / "deploy" / "docker"
KUBERAY = REPO_ROOT / "deploy" / "kuberay"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
REF_LABEL = "org.opencontainers.image.ref.name"
VERSION_LABEL = "org.opencontainers.image.version"
# Distributions whose import name is not their name with '-' -> '_'.
IMPORT_NAMES = {"pyyaml": "yaml", "pillow": "PIL"}
# What a base image already has importable.
BASE_PROVIDES = {"rayproject/ray": {"ray"}}
# Bases for images that are not Ray pods. sglang >= 0.5.20 ships CUDA 13 builds only and
# compiles some kernels with nvcc at run time: a CUDA 13 toolkit ("devel") image.
OTHER_BASES = {"deepeyes-judge-server": re.compile(r"nvidia/cuda:13\.\d+(\.\d+)?-(cudnn-)?devel-ubuntu\d+\.\d+")}
SEPARATORS = {"&&", "||", ";", "|", "then", "else", "fi", "do", "done"}
VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url",
                 "-f", "--find-links", "--python", "--target", "-t", "--prefix"}


# ---------------------------------------------------------------------------------------------
# Dockerfiles


@dataclass
class Dockerfile:
    name: str
    args: dict[str, str] = field(default_factory=dict)
    base: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    entrypoint: list[str] | None = None
    copies: list[tuple[list[str], str]] = field(default_factory=list)   # (sources, destination)
    installs: list[tuple[str, bool]] = field(default_factory=list)      # (pip requirement, with its deps)
    runs: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return self.labels.get(REF_LABEL, "")


def instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, rest) with continuation lines joined and comment lines dropped."""
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        if logical.strip():
            word, _, rest = logical.strip().partition(" ")
            yield word.upper(), rest.strip()
        logical = ""


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)(:-[^}]*)?\}|\$(\w+)",
                  lambda m: values.get(m.group(1) or m.group(3), m.group(0)), text)


def pip_requirements(command: str) -> list[tuple[str, bool]]:
    """(requirement, with its dependencies) of every `pip install` / `uv pip install` in a command."""
    words = [w.rstrip(";") for w in shlex.split(command)]
    reqs: list[tuple[str, bool]] = []
    i = 0
    while i < len(words):
        if words[i] == "install" and i > 0 and words[i - 1].endswith("pip"):
            i += 1
            specs: list[str] = []
            deps = True
            while i < len(words) and words[i] not in SEPARATORS:
                w = words[i]
                if w in VALUE_OPTIONS:
                    i += 1
                elif w == "--no-deps":
                    deps = False
                elif not w.startswith("-"):
                    specs.append(w)
                i += 1
            reqs += [(s, deps) for s in specs]
        i += 1
    return reqs


def parse_dockerfile(name: str, text: str) -> Dockerfile:
    df = Dockerfile(name=name)
    for word, rest in instructions(text):
        if word == "ARG":
            key, _, default = rest.partition("=")
            df.args[key] = default.strip("'\"")
            continue
        # `if [ -n "$X" ]; then ...` with X empty by default installs nothing by default
        guards = re.findall(r'\[ -n "?\$\{?(\w+)\}?"? \]', rest)
        skipped = any(not {**df.args, **df.env}.get(g) for g in guards)
        rest = substitute(rest, {**df.args, **df.env})
        if word == "FROM":
            df.base = rest.split()[0]
        elif word == "LABEL":
            df.labels.update(dict(kv.split("=", 1) for kv in shlex.split(rest)))
        elif word == "ENV":
            df.env.update(dict(kv.split("=", 1) for kv in shlex.split(rest)))
        elif word == "WORKDIR":
            df.workdir = rest
        elif word == "ENTRYPOINT":
            df.entrypoint = json.loads(rest)
        elif word == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            df.copies.append((parts[:-1], parts[-1]))
        elif word == "RUN":
            df.runs.append(rest)
            if not skipped:
                df.installs += pip_requirements(rest)
    return df


def project_import_names() -> set[str]:
    return {p.rstrip("*").rstrip(".") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}


def import_name(req: str) -> str:
    name = Requirement(req).name.lower()
    return IMPORT_NAMES.get(name, name.replace("-", "_"))


def copied(df: Dockerfile, source_top: str) -> bool:
    """Is the repository's top-level file/folder `source_top` copied into the image (under WORKDIR)?"""
    for sources, dest in df.copies:
        if dest.rstrip("/").startswith(df.workdir.rstrip("/")) or dest in (".", "./"):
            if any(s.rstrip("/") in (source_top, ".") for s in sources):
                return True
    return False


def provides(df: Dockerfile) -> set[str]:
    """Import names importable in the image."""
    names = set().union(*(v for k, v in BASE_PROVIDES.items() if df.base.startswith(k + ":")))
    project = PYPROJECT["project"]
    for spec, deps in df.installs:
        m = re.fullmatch(r"(\.|/[^\[\]]*)(\[([\w,-]+)\])?", spec)
        if m:  # a path: this repository, if its pyproject.toml is there
            path = df.workdir if m.group(1) == "." else m.group(1)
            if path.rstrip("/") != df.workdir.rstrip("/") or not copied(df, "pyproject.toml"):
                continue
            names |= {p for p in project_import_names() if copied(df, p)}
            if not deps:  # --no-deps: the packages only, not what they or the extras need
                continue
            reqs = list(project["dependencies"])
            for extra in (m.group(3) or "").split(","):
                if extra:
                    reqs += project["optional-dependencies"][extra]
            names |= {import_name(r) for r in reqs}
        else:
            names.add(import_name(spec))
    return names


def provides_python(df: Dockerfile) -> bool:
    """Does `python` resolve in the image (the manifests' commands start with it)?"""
    if df.base.startswith(("rayproject/ray:", "python:")):
        return True
    venvs = {m.group(1) for r in df.runs for m in re.finditer(r"-m venv (\S+)", r)}
    path = df.env.get("PATH", "").split(":")
    return any(f"{v.rstrip('/')}/bin" in path for v in venvs)


# ---------------------------------------------------------------------------------------------
# manifests


@dataclass
class Pod:
    """What one image has to run, gathered over the manifests."""

    image: str
    manifests: set[str] = field(default_factory=set)
    commands: list[list[str]] = field(default_factory=list)   # container commands
    needs: set[str] = field(default_factory=set)              # import names
    files: set[str] = field(default_factory=set)              # repository paths read at run time
    ray_version: str | None = None


def containers(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for c in node.get("containers", []):
            yield c
        for v in node.values():
            yield from containers(v)
    elif isinstance(node, list):
        for v in node:
            yield from containers(v)


def module_of(argv: list[str]) -> str | None:
    """X of `python -m X ...` (also python3, python3.11)."""
    if len(argv) >= 3 and re.fullmatch(r"python(3(\.\d+)?)?", Path(argv[0]).name) and argv[1] == "-m":
        return argv[2]
    return None


def scenario_needs(config: str, overrides: list[str]) -> set[str]:
    cfg = load_config(REPO_ROOT / config, overrides)
    needs = set()
    if cfg.rollout.engine == "vllm":
        needs.add("vllm")
    if cfg.model.attn_implementation == "flash_attention_2":
        needs.add("flash_attn")
    return needs


def trainer_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--config path, key=value overrides) of a `python -m trainer` command line."""
    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    return config, [a for a in argv[3:] if "=" in a and not a.startswith("-")]


def pods(docs: dict[str, list[dict[str, Any]]]) -> dict[str, Pod]:
    out: dict[str, Pod] = {}
    for fname, manifest in docs.items():
        for doc in manifest:
            spec = doc.get("spec", {})
            cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
            ray_work: list[tuple[list[str], str | None, list[str]]] = []  # (modules, config, overrides)
            if "entrypoint" in spec:
                argv = shlex.split(spec["entrypoint"])
                config, overrides = trainer_config(argv)
                ray_work.append(([module_of(argv) or ""], config, overrides))
            if "serveConfigV2" in spec:
                for app in yaml.safe_load(spec["serveConfigV2"])["applications"]:
                    args = app.get("args", {})
                    ray_work.append(([app["import_path"].split(":")[0]], args.get("config"), args.get("overrides", [])))
            for c in containers(doc):
                pod = out.setdefault(c["image"], Pod(image=c["image"]))
                pod.manifests.add(fname)
                if c.get("command"):
                    argv = [str(a) for a in c["command"]] + [str(a) for a in c.get("args", [])]
                    pod.commands.append(argv)
                    if module_of(argv):
                        pod.needs.add(module_of(argv).split(".")[0])
                if cluster is not None:  # a Ray pod: runs the job's driver and the Serve apps
                    pod.ray_version = str(cluster["rayVersion"])
                    for modules, config, overrides in ray_work:
                        pod.needs |= {m.split(".")[0] for m in modules if m}
                        if config:
                            pod.files.add(config)
                            pod.needs |= scenario_needs(config, overrides)
    return out


# ---------------------------------------------------------------------------------------------
# the check


def python_tag() -> str:
    m = re.search(r"3\.(\d+)", PYPROJECT["project"]["requires-python"])
    return f"py3{m.group(1)}"


def problems(manifests: dict[str, str], dockerfiles: dict[str, str]) -> list[str]:
    """Everything wrong between the manifests (name -> YAML text) and the Dockerfiles (name -> text)."""
    docs = {n: [d for d in yaml.safe_load_all(t) if d] for n, t in manifests.items()}
    parsed = [parse_dockerfile(n, t) for n, t in dockerfiles.items()]
    by_ref = {df.ref: df for df in parsed if df.ref}
    out: list[str] = []
    version = PYPROJECT["project"]["version"]
    for df in parsed:
        if not df.ref:
            out.append(f"{df.name}: no LABEL {REF_LABEL}=<name>:<tag>")
        elif df.labels.get(VERSION_LABEL) != version or version not in df.ref.split(":")[-1]:
            out.append(f"{df.name}: version label {df.labels.get(VERSION_LABEL)!r} / tag of {df.ref} "
                       f"do not carry the project version {version}")
    for image, pod in sorted(pods(docs).items()):
        where = f"{image} ({', '.join(sorted(pod.manifests))})"
        df = by_ref.get(image)
        if df is None:
            out.append(f"{where}: no Dockerfile in deploy/docker has LABEL {REF_LABEL}=\"{image}\"")
            continue
        repo = image.split(":")[0]
        if pod.ray_version is not None:
            flavour = "-gpu" if image.endswith("-gpu") else ""
            want = f"rayproject/ray:{pod.ray_version}-{python_tag()}{flavour}"
            if df.base != want:
                out.append(f"{where}: {df.name} is FROM {df.base}, expected {want} (rayVersion {pod.ray_version})")
        elif repo in OTHER_BASES:
            if not OTHER_BASES[repo].fullmatch(df.base):
                out.append(f"{where}: {df.name} is FROM {df.base}, expected {OTHER_BASES[repo].pattern}")
        else:
            out.append(f"{where}: no expected base known for {repo}")
        missing = pod.needs - provides(df)
        if missing:
            out.append(f"{where}: {df.name} does not install {sorted(missing)} (installs {[s for s, _ in df.installs]})")
        for f in sorted(pod.files):
            if not copied(df, Path(f).parts[0]):
                out.append(f"{where}: {df.name} does not copy {f} into {df.workdir}")
        for argv in pod.commands:
            if argv[0].startswith("python") and not provides_python(df):
                out.append(f"{where}: {df.name} has no `python` on PATH for {argv[:3]}")
            if df.entrypoint is not None and module_of(argv) and argv[:3] != df.entrypoint[:3]:
                out.append(f"{where}: {df.name} ENTRYPOINT {df.entrypoint} is not what the manifest runs ({argv[:3]})")
        # A pin that pyproject.toml states in an extra is stated once: the Dockerfile matches it.
        extras = [Requirement(r) for rs in PYPROJECT["project"]["optional-dependencies"].values() for r in rs]
        for spec, _ in df.installs:
            if re.match(r"[./]", spec):
                continue
            req = Requirement(spec)
            for pinned in extras:
                if pinned.name == req.name and pinned.specifier != req.specifier:
                    out.append(f"{df.name}: installs {spec}, pyproject.toml's extra says {pinned}")
    return out


def real_manifests() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(KUBERAY.glob("*.yaml"))}


def real_dockerfiles() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(DOCKER.glob("Dockerfile*")) if not p.name.endswith(".dockerignore")}


# ---------------------------------------------------------------------------------------------
# tests


def test_every_manifest_image_has_a_dockerfile_that_runs_it() -> None:
    assert problems(real_manifests(), real_dockerfiles()) == []


def test_the_manifests_name_the_two_images() -> None:
    assert set(pods({n: [d for d in yaml.safe_load_all(t) if d] for n, t in real_manifests().items()})) == {
        "deepeyes-ray:0.1.0-gpu", "deepeyes-judge-server:0.1.0"}


def test_what_the_pods_need() -> None:
    """The needs the checker derives: a wrong derivation would make the main test vacuous."""
    found = pods({n: [d for d in yaml.safe_load_all(t) if d] for n, t in real_manifests().items()})
    ray_pod = found["deepeyes-ray:0.1.0-gpu"]
    assert {"trainer", "services", "vllm", "flash_attn"} <= ray_pod.needs
    assert ray_pod.files == {"deploy/configs/deepeyes-7b.yaml"}
    assert found["deepeyes-judge-server:0.1.0"].needs == {"sglang"}


def test_what_the_images_provide() -> None:
    dfs = {n: parse_dockerfile(n, t) for n, t in real_dockerfiles().items()}
    gpu = provides(dfs["Dockerfile.gpu"])
    assert {"ray", "torch", "transformers", "trainer", "services", "deepeyes", "vllm", "flash_attn"} <= gpu
    assert "sglang" not in gpu
    judge = provides(dfs["Dockerfile.judge-server"])
    assert "sglang" in judge and "vllm" not in judge and "trainer" not in judge
    assert ("torch==2.13.0", True) in dfs["Dockerfile.gpu"].installs


def _break(name: str, old: str, new: str) -> dict[str, str]:
    files = real_dockerfiles()
    assert old in files[name], f"{name} no longer contains {old!r}: update this test"
    files[name] = files[name].replace(old, new)
    return files


@pytest.mark.parametrize("dockerfiles, expected", [
    pytest.param(lambda: {k: v for k, v in real_dockerfiles().items() if k != "Dockerfile.judge-server"},
                 "deepeyes-judge-server:0.1.0 (judge-sglang.yaml): no Dockerfile", id="judge Dockerfile removed"),
    pytest.param(lambda: _break("Dockerfile.judge-server", "RUN pip install 'sglang==0.5.23' && \\\n", "RUN "),
                 "does not install ['sglang']", id="sglang install removed"),
    pytest.param(lambda: _break("Dockerfile.judge-server", "sglang==0.5.23", "sglang==0.5.22"),
                 "pyproject.toml's extra says sglang==0.5.23", id="sglang pin drifts"),
    pytest.param(lambda: _break("Dockerfile.gpu", "-e '/app[gpu]'\n", "-e /app\n"),
                 "does not install ['vllm']", id="gpu extra dropped"),
    pytest.param(lambda: _break("Dockerfile.gpu", "RUN pip install -c /app/.pip-constraints.txt -e '/app[gpu]'\n", ""),
                 "does not install ['vllm']", id="dependencies install removed"),  # ray: the base has it
    pytest.param(lambda: _break("Dockerfile.gpu", "ARG FLASH_ATTN=2.8.3.post2", "ARG FLASH_ATTN="),
                 "does not install ['flash_attn']", id="flash-attn off"),
    pytest.param(lambda: _break("Dockerfile.gpu", "COPY --chown=1000:100 trainer /app/trainer\n", ""),
                 "does not install ['trainer']", id="trainer not copied"),
    pytest.param(lambda: _break("Dockerfile.gpu", "COPY --chown=1000:100 deploy /app/deploy\n", ""),
                 "does not copy deploy/configs/deepeyes-7b.yaml", id="scenario not copied"),
    pytest.param(lambda: _break("Dockerfile.gpu", "FROM rayproject/ray:2.60.0-py311-gpu", "FROM rayproject/ray:2.59.0-py311-gpu"),
                 "expected rayproject/ray:2.60.0-py311-gpu", id="ray base drifts from rayVersion"),
    pytest.param(lambda: _break("Dockerfile.judge-server", "FROM nvidia/cuda:13.0.3-cudnn-devel-ubuntu24.04", "FROM python:3.11"),
                 "is FROM python:3.11, expected", id="judge base without CUDA toolkit"),
    pytest.param(lambda: _break("Dockerfile.judge-server", '["python", "-m", "sglang.launch_server"]', '["python", "-m", "sglang.serve"]'),
                 "ENTRYPOINT", id="judge entrypoint differs"),
    pytest.param(lambda: _break("Dockerfile.judge-server", "PATH=/opt/venv/bin:$PATH", "PATH=$PATH"),
                 "no `python` on PATH", id="venv not on PATH"),
    pytest.param(lambda: _break("Dockerfile.gpu", 'org.opencontainers.image.ref.name="deepeyes-ray:0.1.0-gpu"',
                                'org.opencontainers.image.ref.name="deepeyes-ray:0.1.0"'),
                 "deepeyes-ray:0.1.0-gpu (rayjob.yaml, rayservice.yaml): no Dockerfile", id="label names another tag"),
])
def test_the_checker_catches(dockerfiles, expected: str) -> None:
    found = problems(real_manifests(), dockerfiles())
    assert any(expected in p for p in found), found
