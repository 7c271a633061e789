"""Real libvirt 11.3 for the e2e tests: daemons, domain XML, one boot at a time.

libvirt is the stack most users reach shardfs through, and it talks to the
backend only through virtiofsd's command line and discovery files.  So these
helpers drive the real thing -- ``libvirtd`` and ``virtlogd`` from
bookworm-backports (``scripts/install-test-deps``), ``virsh`` as the client --
and boot the same guest as ``guest.py`` (direct kernel boot, the host's ``/``
read-only over 9p, a read-write 9p *ctl dir* holding ``script.sh``).

**Daemons (no systemd).**  :class:`SystemLibvirt` starts ``virtlogd`` and
``libvirtd`` itself, as root, each in a private mount namespace
(``unshare --mount``) where a fresh directory is bind-mounted over each of
``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/log/libvirt``
and ``/var/cache/libvirt``.  A privileged libvirtd has those paths compiled
in (no option moves ``qemu.conf`` or its state), and the machine is shared:
the namespace gives the test its own config, sockets, state and logs without
touching the host's, and cannot collide with a libvirtd someone else runs.
``/etc/qemu/vhost-user`` (backend discovery) is deliberately *not* hidden:
the discovery test installs its JSON where a user would.
:class:`SessionLibvirt` is ``qemu:///session``: the same two daemons as an
unprivileged user, whose ``$HOME`` and ``$XDG_*`` dirs point into the test's
directory.

**QEMU runs as libvirt-qemu:kvm**, Debian's default, written out in the
test's ``qemu.conf``.  Running it as root would be simpler, and would hide
exactly what users meet: a socket shardfs creates must let group ``kvm`` in
(``--socket-group kvm``), and every file QEMU opens (kernel, initramfs,
console log, the 9p shares) must be reachable by that user.  Hence the
choices below: the kernel and initramfs are copied into the test's directory
(libvirt's DAC driver chowns them to QEMU's user for the run, which it should
not do to ``/boot``); the test's directories are mode 0755; the ctl dir
belongs to QEMU's user; and the 9p shares use ``accessmode='squash'``
(QEMU's ``security_model=none``), because in ``passthrough`` mode an
unprivileged QEMU fails every create in which it cannot chown the file to
the guest's uid.  The daemons libvirt launches for ``<binary>`` (shardfs)
run as root, as virtiofsd does.  ``cgroup_controllers = []``: without
systemd the test does not own a cgroup tree to give libvirt.

**Finding what libvirt ran.**  libvirt logs each command it runs
(``About to run ...``) at debug level of its ``util.command`` log category;
the test's ``libvirtd.conf`` sends that category to ``libvirtd.log``, the
first place a user looks.  The domain log (``qemu/NAME.log``) holds QEMU's
command line, and ``qemu/NAME-ALIAS-virtiofsd.log`` the backend's own output.

Nothing here depends on timing except generous overall timeouts (socket
waits, one per boot), which fail loudly with the logs.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from guest import (
    REPO_ROOT,
    TIMEOUT_SCALE,
    GuestImage,
    GuestResult,
    GuestTimeout,
    _die_with_parent,
    read_text,
    tail,
)

#: libvirt's QEMU user and group on Debian (``qemu.conf`` ``user``/``group``).
QEMU_USER = "libvirt-qemu"
QEMU_GROUP = "kvm"
#: The libvirt this suite is written against (bookworm-backports).
MIN_LIBVIRT_VERSION = (11, 3)
#: The checkout's launcher, as a user would name it in ``<binary path>``.
SHARDFS_BINARY = REPO_ROOT / "scripts" / "shardfs"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: How long a daemon may take to create its socket (machine shared, 2 cores).
DAEMON_START_TIMEOUT_S = 120.0
#: How long a daemon may take to exit after SIGTERM before it is killed.
DAEMON_STOP_TIMEOUT_S = 30.0
#: Overall timeout of one boot (libvirt starts the backends, then QEMU, TCG).
DOMAIN_TIMEOUT_S = 300.0
#: How long libvirt may take to tear a domain down after its QEMU is gone.
TEARDOWN_TIMEOUT_S = 60.0
#: One virsh call (libvirtd probes QEMU's capabilities before it answers the first).
VIRSH_TIMEOUT_S = 120.0
#: Each poll of ``virsh domstate`` while a domain runs.
POLL_INTERVAL_S = 0.5

#: (directory name under the test's base, path it replaces in libvirtd's namespace)
SYSTEM_BINDS = (
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
)

#: The libvirtd.conf both modes use: no polkit (no D-Bus here), and the
#: command lines libvirt runs go to libvirtd.log (see the module docstring).
LIBVIRTD_CONF = """\
auth_unix_ro = "none"
auth_unix_rw = "none"
log_filters = "1:util.command"
log_outputs = "1:file:{log} 3:stderr"
"""
VIRTLOGD_CONF = 'log_outputs = "3:stderr"\n'
SYSTEM_QEMU_CONF = f"""\
user = "{QEMU_USER}"
group = "{QEMU_GROUP}"
security_driver = "none"
cgroup_controllers = [ ]
"""

_ABOUT_TO_RUN = re.compile(r"virCommandRunAsync:\d+ : About to run (.*)$")


class LibvirtError(AssertionError):
    """libvirt (a daemon or virsh) failed where the test needed it to work."""


# --------------------------------------------------------------------------- prerequisites


def missing_prerequisites() -> str | None:
    """Why the libvirt tests cannot run here, or None if they can."""
    hint = "run scripts/install-test-deps as root"
    for tool in ("libvirtd", "virtlogd", "virsh"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"{tool} not found ({hint})"
    res = subprocess.run(["virsh", "--version"], capture_output=True, text=True, check=False)
    match = re.match(r"(\d+)\.(\d+)", res.stdout.strip())
    if match is None or (int(match[1]), int(match[2])) < MIN_LIBVIRT_VERSION:
        return f"virsh --version says {res.stdout.strip()!r}, need libvirt >= 11.3 ({hint})"
    try:
        pwd.getpwnam(QEMU_USER)
        grp.getgrnam(QEMU_GROUP)
    except KeyError:
        return f"no user {QEMU_USER} or group {QEMU_GROUP} ({hint})"
    if os.geteuid() != 0:
        return "the libvirt tests run libvirtd as root"
    return None


# --------------------------------------------------------------------------- daemons


@dataclass
class Daemon:
    """One libvirt daemon as our child (its own session, SIGKILLed if we die)."""

    name: str
    command: list[str]
    log_path: Path
    ready_path: Path
    user: str | None = None
    env: Mapping[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(self.env) if self.env is not None else None,
                user=self.user,
                group=None if self.user is None else pwd.getpwnam(self.user).pw_gid,
                extra_groups=None if self.user is None else [],
                cwd="/",
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S * TIMEOUT_SCALE
        while not self.ready_path.exists():
            if self.proc.poll() is not None:
                raise LibvirtError(
                    f"{self.name} exited with {self.proc.returncode} before creating "
                    f"{self.ready_path}\n{self.describe()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise LibvirtError(f"{self.name} did not create {self.ready_path}\n"
                                   + self.describe())
            time.sleep(POLL_INTERVAL_S / 10)

    def describe(self) -> str:
        return (f"{self.name}: {shlex.join(self.command)}\n--- {self.log_path} (tail) ---\n"
                + tail(read_text(self.log_path), 40))

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for the whole group if it does not exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=DAEMON_STOP_TIMEOUT_S * TIMEOUT_SCALE)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# --------------------------------------------------------------------------- domain XML


@dataclass(frozen=True)
class VirtioFs:
    """One ``<filesystem>`` with the virtiofs driver, mounted in the guest by *tag*.

    Exactly one of *source_dir* (libvirt starts the backend: *binary*, or the
    one a vhost-user JSON names when *binary* is None) and *socket* (an
    external backend) is set.  *binary_xml* goes inside ``<binary>``
    (``<cache/>``, ``<sandbox/>``, ``<thread_pool/>``, ``<openfiles/>``), and
    *extra_xml* inside ``<filesystem>`` (``<readonly/>``, ``<idmap>``).
    """

    tag: str
    source_dir: Path | None = None
    socket: Path | None = None
    binary: Path | None = SHARDFS_BINARY
    xattr: str | None = None
    binary_xml: str = ""
    extra_xml: str = ""

    @property
    def alias(self) -> str:
        """The device alias (libvirt requires user aliases to start with ``ua-``)."""
        return f"ua-{self.tag}"

    def xml(self) -> str:
        if (self.source_dir is None) == (self.socket is None):
            raise ValueError(f"virtiofs {self.tag}: give exactly one of source_dir and socket")
        lines = ["<filesystem type='mount'>", "  <driver type='virtiofs' queue='1024'/>"]
        if self.source_dir is not None and self.binary is not None:
            attrs = f" path={quoteattr(str(self.binary))}"
            if self.xattr is not None:
                attrs += f" xattr={quoteattr(self.xattr)}"
            lines.append(f"  <binary{attrs}>{self.binary_xml}</binary>")
        if self.source_dir is not None:
            lines.append(f"  <source dir={quoteattr(str(self.source_dir))}/>")
        else:
            lines.append(f"  <source socket={quoteattr(str(self.socket))}/>")
        lines += [f"  <target dir={quoteattr(self.tag)}/>", f"  <alias name='{self.alias}'/>"]
        if self.extra_xml:
            lines.append("  " + self.extra_xml)
        lines.append("</filesystem>")
        return "\n".join(lines)


def num_request_queues_override(alias: str, queues: int) -> str:
    """``<qemu:override>`` giving the vhost-user-fs device *queues* request queues.

    libvirt 11.3 has no XML for virtio-fs ``num-request-queues``; the override
    sets the QEMU device property directly (the backend must serve that many).
    """
    return textwrap.dedent(
        f"""\
        <qemu:override>
          <qemu:device alias='{alias}'>
            <qemu:frontend>
              <qemu:property name='num-request-queues' type='unsigned' value='{queues}'/>
            </qemu:frontend>
          </qemu:device>
        </qemu:override>"""
    )


def ninep_xml(source: Path, tag: str, *, readonly: bool) -> str:
    """A 9p share as guest.py's QEMU command line gives it (see the docstring on squash)."""
    return (
        "<filesystem type='mount' accessmode='squash' multidevs='remap'>"
        f"<driver type='path'/><source dir={quoteattr(str(source))}/>"
        f"<target dir={quoteattr(tag)}/>{'<readonly/>' if readonly else ''}</filesystem>"
    )


def domain_xml(
    *,
    name: str,
    kernel: Path,
    initrd: Path,
    ctl_dir: Path,
    console_path: Path,
    filesystems: Sequence[VirtioFs],
    vcpus: int = 1,
    mem_mib: int = 512,
    extra_xml: str = "",
) -> str:
    """A TCG domain that boots guest.py's kernel and initramfs and powers off when done.

    The same machine as :func:`guest.qemu_command`: q35, memfd shared memory
    (vhost-user needs it), the host's ``/`` and the ctl dir over 9p, the serial
    console to a file, and ``on_poweroff=destroy`` so the domain ends with the
    guest script.
    """
    devices = [
        ninep_xml(Path("/"), "hostroot", readonly=True),
        ninep_xml(ctl_dir, "ctl", readonly=False),
        *(fs.xml() for fs in filesystems),
        f"<serial type='file'><source path={quoteattr(str(console_path))}/></serial>",
        "<controller type='usb' model='none'/>",
        "<memballoon model='none'/>",
    ]
    body = textwrap.indent("\n".join(devices), "    ")
    return f"""\
<domain type='qemu' xmlns:qemu='{QEMU_NS}'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{mem_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
{body}
  </devices>
{textwrap.indent(extra_xml, "  ")}
</domain>
"""


# --------------------------------------------------------------------------- one boot


def option_given(command: Sequence[str], name: str, value: str | None = None) -> bool:
    """Whether virtiofsd-style *command* gives option *name* (``--cache``) [= *value*].

    Accepts ``--name value``, ``--name=value`` and the legacy ``-o name=value``
    (``-o name`` for a flag), so a check states what libvirt asked for, not
    which of virtiofsd's spellings it chose.
    """
    args = list(command)
    for i, arg in enumerate(args):
        if value is None and arg == name:
            return True
        if arg == f"{name}={value}" or (arg == name and args[i + 1:i + 2] == [value]):
            return True
        if arg == "-o" and i + 1 < len(args):
            legacy = name.removeprefix("--").replace("-", "_")
            items = args[i + 1].split(",")
            if (legacy if value is None else f"{legacy}={value}") in items:
                return True
    return False


@dataclass
class DomainRun:
    """One domain from ``virsh create`` to its end, with everything libvirt logged."""

    name: str
    xml: str
    work_dir: Path
    #: virsh create's error, or "" if the domain started.
    create_error: str
    result: GuestResult | None
    domain_log: str
    #: The commands libvirtd ran during this boot (``About to run`` lines), split.
    commands: list[list[str]] = field(default_factory=list)
    #: alias -> the backend's output as libvirt logged it (``NAME-ALIAS-virtiofsd.log``).
    backend_logs: dict[str, str] = field(default_factory=dict)
    #: Processes still running with a share dir on their command line after the domain ended.
    leftover_backends: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"domain {self.name} (work dir {self.work_dir})"]
        if self.create_error:
            parts.append(f"virsh create failed:\n{self.create_error}")
        for cmd in self.backend_commands():
            parts.append("libvirt ran: " + shlex.join(cmd))
        for alias, text in self.backend_logs.items():
            parts.append(f"--- backend log {alias} (tail) ---\n{tail(text, 30)}")
        parts.append(f"--- domain log (tail) ---\n{tail(self.domain_log, 15)}")
        if self.result is not None:
            parts.append(self.result.describe(lines=40))
        return "\n".join(parts)

    def ok(self) -> GuestResult:
        """The guest's result; fails with the logs unless the domain started and its script ran."""
        if self.result is None:
            raise AssertionError("the domain did not start\n" + self.describe())
        if self.result.exit_code is None:
            raise AssertionError("the guest script did not finish\n" + self.describe())
        return self.result

    def backend_commands(self) -> list[list[str]]:
        """The commands that started backends (not QEMU, not capability probes)."""
        return [
            cmd for cmd in self.commands
            if "--print-capabilities" not in cmd and not cmd[0].endswith("dmidecode")
            and not any("qemu-system" in arg for arg in cmd)
        ]

    def backend_command(self, source_dir: Path) -> list[str]:
        """The command libvirt started the backend for *source_dir* with."""
        for cmd in self.backend_commands():
            if str(source_dir) in cmd or any(f"source={source_dir}" in a for a in cmd):
                return cmd
        raise AssertionError(f"libvirt ran no backend for {source_dir}\n" + self.describe())

    def step_rc(self, step: str) -> int | None:
        text = self.ok().ctl(f"{step}.rc").strip()
        return int(text) if text.lstrip("-").isdigit() else None

    def assert_step(self, step: str, *, rc: int | None = 0) -> None:
        """Fail unless guest step *step* ran and exited *rc* (None: any non-zero status)."""
        got = self.step_rc(step)
        if got is None or (got != rc if rc is not None else got == 0):
            want = "a failure" if rc is None else f"exit {rc}"
            raise AssertionError(
                f"guest step {step!r}: wanted {want}, got "
                + ("no result" if got is None else f"exit {got}")
                + f"\n--- step log ---\n{self.ok().ctl(f'{step}.log')}\n" + self.describe()
            )


#: Guest step that waits for the host's ``while_running`` call (see :meth:`Libvirt.boot`).
PAUSE_STEP = textwrap.dedent(
    """\
    pause_for_host() {
        : >"$CTL/ready"
        while [ ! -e "$CTL/go" ]; do sleep 0.1; done
    }
    step pause pause_for_host
    """
)


class Libvirt:
    """What both modes share: virsh against our daemons, and booting a domain."""

    uri: str
    base: Path
    #: Where libvirt writes NAME.log and NAME-ALIAS-virtiofsd.log.
    domain_log_dir: Path
    libvirtd_log: Path
    #: (uid, gid) QEMU runs as: owner of each ctl dir.
    qemu_ids: tuple[int, int]
    virsh_user: str | None = None
    virsh_env: Mapping[str, str] | None = None
    daemons: list[Daemon]

    def __init__(self, base: Path, image: GuestImage) -> None:
        self.base = base
        self.daemons = []
        self._counter = 0
        # Copies QEMU's user can read (libvirt relabels them for the run).
        boot = base / "boot"
        boot.mkdir(mode=0o755, exist_ok=True)
        self.kernel = boot / "vmlinuz"
        self.initrd = boot / "initramfs.cpio.gz"
        shutil.copyfile(image.kernel, self.kernel)
        shutil.copyfile(image.initrd, self.initrd)
        for p in (self.kernel, self.initrd):
            p.chmod(0o644)

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            res = subprocess.run(
                ["virsh", "-q", "-c", self.uri, *args],
                capture_output=True, text=True, check=False,
                timeout=VIRSH_TIMEOUT_S * TIMEOUT_SCALE, stdin=subprocess.DEVNULL, cwd="/",
                user=self.virsh_user,
                env=dict(self.virsh_env) if self.virsh_env is not None else None,
            )
        except subprocess.TimeoutExpired as e:
            raise LibvirtError(f"virsh {shlex.join(args)} did not answer within {e.timeout:.0f}s\n"
                               + self.describe()) from None
        if check and res.returncode != 0:
            raise LibvirtError(f"virsh {shlex.join(args)} failed ({res.returncode}): "
                               f"{res.stderr.strip()}\n" + self.describe())
        return res

    def describe(self) -> str:
        return "\n".join(d.describe() for d in self.daemons)

    def boot(
        self,
        script: str,
        *,
        filesystems: Sequence[VirtioFs],
        vcpus: int = 1,
        extra_xml: str = "",
        timeout_s: float = DOMAIN_TIMEOUT_S,
        while_running: Callable[[str], None] | None = None,
    ) -> DomainRun:
        """Create a transient domain running *script* in the guest; wait until it is gone.

        Returns the run whether or not libvirt could start the domain (tests
        assert on :attr:`DomainRun.create_error` or :meth:`DomainRun.ok`).  If
        the guest is still running after *timeout_s*, the domain is destroyed
        and GuestTimeout raised with the logs.

        *while_running* (called with the domain's name) looks at the host while
        the guest waits: the script signals with ``$CTL/ready`` (see
        :data:`PAUSE_STEP`) and carries on once the call has returned.
        """
        self._counter += 1
        name = f"shardfs-{os.getpid()}-{self._counter}"
        work = self.base / "domains" / name
        ctl = work / "ctl"
        ctl.mkdir(parents=True)
        work.chmod(0o755)
        os.chown(work, *self.qemu_ids)  # a session QEMU creates its console log here
        (ctl / "script.sh").write_text(script)
        os.chown(ctl, *self.qemu_ids)
        console = work / "console.log"
        xml = domain_xml(name=name, kernel=self.kernel, initrd=self.initrd, ctl_dir=ctl,
                         console_path=console, filesystems=filesystems, vcpus=vcpus,
                         extra_xml=extra_xml)
        xml_path = work / "domain.xml"
        xml_path.write_text(xml)
        xml_path.chmod(0o644)
        log_offset = self.libvirtd_log.stat().st_size if self.libvirtd_log.exists() else 0
        start = time.monotonic()
        created = self.virsh("create", str(xml_path), check=False)
        result: GuestResult | None = None
        if created.returncode == 0:
            deadline = start + timeout_s * TIMEOUT_SCALE
            if while_running is not None:
                self._pause(name, ctl, deadline, work, while_running)
            self._wait_gone(name, deadline, work)
            code = read_text(ctl / "exit_code").strip()
            result = GuestResult(
                exit_code=int(code) if code.lstrip("-").isdigit() else None,
                console_log=read_text(console),
                ctl_dir=ctl,
                qemu_returncode=0,
                qemu_log=read_text(self.domain_log_dir / f"{name}.log"),
                duration_s=time.monotonic() - start,
                work_dir=work,
            )
        run = DomainRun(
            name=name, xml=xml, work_dir=work,
            create_error=created.stderr.strip() if created.returncode != 0 else "",
            result=result,
            domain_log=read_text(self.domain_log_dir / f"{name}.log"),
            commands=self._commands_since(log_offset),
            backend_logs={
                fs.alias: read_text(self.domain_log_dir / f"{name}-{fs.alias}-virtiofsd.log")
                for fs in filesystems if fs.source_dir is not None
            },
        )
        run.leftover_backends = _processes_naming(
            [str(fs.source_dir) for fs in filesystems if fs.source_dir is not None])
        return run

    def _pause(self, name: str, ctl: Path, deadline: float, work: Path,
               call: Callable[[str], None]) -> None:
        """Wait for ``$CTL/ready`` (or the domain's end), call *call*, release the guest."""
        try:
            while not (ctl / "ready").exists():
                if self.virsh("domstate", name, check=False).returncode != 0:
                    return  # ended without pausing: the step's result will say why
                if time.monotonic() > deadline:
                    return  # _wait_gone destroys it and reports
                time.sleep(POLL_INTERVAL_S)
            call(name)
        finally:
            (ctl / "go").touch()
            os.chown(ctl / "go", *self.qemu_ids)

    def _wait_gone(self, name: str, deadline: float, work: Path) -> None:
        """Poll until libvirt has torn the domain down (QEMU gone, backends stopped)."""
        while self.virsh("domstate", name, check=False).returncode == 0:
            if time.monotonic() > deadline:
                self.virsh("destroy", name, check=False)
                raise GuestTimeout(
                    f"domain {name} still running after its timeout; destroyed\n"
                    f"--- console (tail) ---\n{tail(read_text(work / 'console.log'), 40)}\n"
                    f"--- domain log (tail) ---\n"
                    f"{tail(read_text(self.domain_log_dir / f'{name}.log'), 20)}"
                )
            time.sleep(POLL_INTERVAL_S)

    def backend_pid(self, alias: str) -> int:
        """The pid of the backend libvirt runs for device *alias* (from its pidfile,
        ``SHORTNAME-ALIAS-fs.pid`` in libvirt's state)."""
        found = sorted(self.base.rglob(f"*-{alias}-fs.pid"))
        assert len(found) == 1, f"pidfiles for {alias}: {found}"
        return int(found[0].read_text().strip())

    def _commands_since(self, offset: int) -> list[list[str]]:
        with open(self.libvirtd_log, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
        commands = []
        for line in text.splitlines():
            match = _ABOUT_TO_RUN.search(line)
            if match is not None:
                try:
                    commands.append(shlex.split(match[1]))
                except ValueError:
                    commands.append(match[1].split())
        return commands

    def close(self) -> None:
        """Destroy what is still running, then stop the daemons (libvirtd first)."""
        try:
            listed = self.virsh("list", "--name", check=False).stdout.split()
            for name in listed:
                self.virsh("destroy", name, check=False)
        finally:
            for daemon in reversed(self.daemons):
                daemon.stop()


def _processes_naming(paths: Sequence[str]) -> list[str]:
    """Command lines of live processes that name one of *paths* (after a grace period).

    libvirt stops the backends it started when the domain ends (SIGTERM, then
    SIGKILL); anything still alive afterwards escaped it.
    """
    if not paths:
        return []
    deadline = time.monotonic() + TEARDOWN_TIMEOUT_S * TIMEOUT_SCALE
    while True:
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                raw = Path(entry.path, "cmdline").read_bytes()
                state = Path(entry.path, "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            argv = raw.decode("utf-8", errors="replace").split("\0")
            if state != b"Z" and any(p in a for a in argv for p in paths):
                found.append(f"{entry.name}: {' '.join(argv).strip()}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(POLL_INTERVAL_S)


class SystemLibvirt(Libvirt):
    """``qemu:///system``: virtlogd and libvirtd as root in a private mount namespace."""

    def __init__(self, base: Path, image: GuestImage) -> None:
        super().__init__(base, image)
        for sub, target in SYSTEM_BINDS:
            (base / sub).mkdir(mode=0o755)
            Path(target).mkdir(parents=True, exist_ok=True)
        etc = base / "etc"
        self.libvirtd_log = base / "log" / "libvirtd.log"
        (etc / "libvirtd.conf").write_text(
            LIBVIRTD_CONF.format(log="/var/log/libvirt/libvirtd.log"))
        (etc / "virtlogd.conf").write_text(VIRTLOGD_CONF)
        (etc / "qemu.conf").write_text(SYSTEM_QEMU_CONF)
        self.uri = f"qemu:///system?socket={base / 'run' / 'libvirt-sock'}"
        self.domain_log_dir = base / "log" / "qemu"
        user = pwd.getpwnam(QEMU_USER)
        self.qemu_ids = (user.pw_uid, grp.getgrnam(QEMU_GROUP).gr_gid)
        binds: list[str] = []
        for sub, target in SYSTEM_BINDS:
            binds += [str(base / sub), target]
        wrapper = [
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-ec",
            'while [ "$1" != -- ]; do mount --bind "$1" "$2"; shift 2; done; shift; exec "$@"',
            "sh", *binds, "--",
        ]
        for name, ready in (("virtlogd", "virtlogd-sock"), ("libvirtd", "libvirt-sock")):
            daemon = Daemon(name=name, command=[*wrapper, name], log_path=base / f"{name}.out",
                            ready_path=base / "run" / ready)
            self.daemons.append(daemon)
            daemon.start()
        self.virsh("version")


def make_base_dir() -> Path:
    """A short (Unix socket paths), world-traversable directory for one libvirt setup."""
    base = Path(tempfile.mkdtemp(prefix="shardfs-libvirt-", dir="/tmp"))
    base.chmod(0o755)
    return base


class SessionLibvirt(Libvirt):
    """``qemu:///session``: virtlogd and libvirtd as the unprivileged *user*.

    Everything libvirt keeps for a session user (config, sockets, state,
    logs) lives under ``$HOME``/``$XDG_*``, which point into *base*; QEMU and
    the backends libvirt starts run as that user.
    """

    def __init__(self, base: Path, image: GuestImage, *, user: str) -> None:
        super().__init__(base, image)
        pw = pwd.getpwnam(user)
        self.qemu_ids = (pw.pw_uid, pw.pw_gid)
        home = base / "home"
        dirs = {
            "HOME": home,
            "XDG_CONFIG_HOME": home / ".config",
            "XDG_CACHE_HOME": home / ".cache",
            "XDG_DATA_HOME": home / ".local" / "share",
            "XDG_STATE_HOME": home / ".local" / "state",
            "XDG_RUNTIME_DIR": base / "xdg-run",
        }
        for d in dirs.values():
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        config = dirs["XDG_CONFIG_HOME"] / "libvirt"
        config.mkdir(mode=0o700)
        self.libvirtd_log = dirs["XDG_CACHE_HOME"] / "libvirt" / "libvirtd.log"
        self.libvirtd_log.parent.mkdir(mode=0o700)
        (config / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(log=self.libvirtd_log))
        (config / "virtlogd.conf").write_text(VIRTLOGD_CONF)
        for dirpath, dirnames, filenames in os.walk(home):
            for name in [*dirnames, *filenames]:
                os.chown(os.path.join(dirpath, name), pw.pw_uid, pw.pw_gid)
        for d in (home, dirs["XDG_RUNTIME_DIR"]):
            os.chown(d, pw.pw_uid, pw.pw_gid)
        self.domain_log_dir = dirs["XDG_CACHE_HOME"] / "libvirt" / "qemu" / "log"
        sockets = dirs["XDG_RUNTIME_DIR"] / "libvirt"
        self.uri = f"qemu:///session?socket={sockets / 'libvirt-sock'}"
        self.virsh_user = user
        self.virsh_env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL": "C",
            **{k: str(v) for k, v in dirs.items()},
        }
        for name, ready in (("virtlogd", "virtlogd-sock"), ("libvirtd", "libvirt-sock")):
            daemon = Daemon(name=name, command=[name], log_path=base / f"{name}.out",
                            ready_path=sockets / ready, user=user, env=self.virsh_env)
            self.daemons.append(daemon)
            daemon.start()
        self.virsh("version")
