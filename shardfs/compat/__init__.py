"""The command-line compatibility layer: shardfs answers to virtiofsd's command line.

Stacks adopt a virtio-fs backend through whatever launches it -- libvirt,
Kata Containers, podman, virtme-ng, a systemd unit -- and every one of them
starts virtiofsd with virtiofsd's own options and relies on its defaults.
This package turns such a command line (virtiofsd 1.13's options, its
deprecated forms and the legacy C daemon's ``-o`` list) into shardfs
:class:`~shardfs.config.Config` overrides, so that shardfs can be dropped in
where virtiofsd was, unchanged.

It sits above :mod:`shardfs.config` (it produces overrides that
:func:`shardfs.config.load` merges) and below :mod:`shardfs.cli` (which
runs the daemon).  Nothing here opens a socket or touches the share.

Modules:

:mod:`shardfs.compat.options`
    the option table: every flag, its ``Config`` field, its virtiofsd
    syntax, and what it does in shardfs (the README's table is its twin);
:mod:`shardfs.compat.legacy`
    the ``-o opt[,opt...]`` list of the C virtiofsd, which libvirt still
    speaks to a backend that does not advertise ``separate-options``;
:mod:`shardfs.compat.parse`
    argv in, :class:`~shardfs.compat.parse.CommandLine` out.
"""

from shardfs.compat.parse import CommandLine, CommandLineError, parse_command_line

__all__ = ["CommandLine", "CommandLineError", "parse_command_line"]
