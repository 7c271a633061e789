"""FUSE wire layouts, opcodes and flags, named as in ``linux/fuse.h``.

Every layout is a precompiled little-endian :class:`struct.Struct` so the hot
path can ``unpack_from``/``pack_into`` guest memory without intermediate
objects (DESIGN §5).  Sizes are checked against the kernel header in
``tests/unit/abi``.

Layouts follow protocol 7.41, the header of Linux 6.12 (``linux-libc-dev``
from bookworm-backports, which the ABI tests compile against), and we speak
it: a guest kernel that sends an older minor gets that minor back, as the
INIT rules in ``fuse.h`` require.
"""

from __future__ import annotations

import enum
import struct

FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR_VERSION = 41
#: The oldest minor we accept: Linux 5.4's virtio-fs driver speaks 7.31.
FUSE_MIN_MINOR_VERSION = 31
FUSE_ROOT_ID = 1

#: The read buffer the kernel guarantees; a smaller reply buffer is malformed.
FUSE_MIN_READ_BUFFER = 8192


class FuseOpcode(enum.IntEnum):
    FUSE_LOOKUP = 1
    FUSE_FORGET = 2
    FUSE_GETATTR = 3
    FUSE_SETATTR = 4
    FUSE_READLINK = 5
    FUSE_SYMLINK = 6
    FUSE_MKNOD = 8
    FUSE_MKDIR = 9
    FUSE_UNLINK = 10
    FUSE_RMDIR = 11
    FUSE_RENAME = 12
    FUSE_LINK = 13
    FUSE_OPEN = 14
    FUSE_READ = 15
    FUSE_WRITE = 16
    FUSE_STATFS = 17
    FUSE_RELEASE = 18
    FUSE_FSYNC = 20
    FUSE_SETXATTR = 21
    FUSE_GETXATTR = 22
    FUSE_LISTXATTR = 23
    FUSE_REMOVEXATTR = 24
    FUSE_FLUSH = 25
    FUSE_INIT = 26
    FUSE_OPENDIR = 27
    FUSE_READDIR = 28
    FUSE_RELEASEDIR = 29
    FUSE_FSYNCDIR = 30
    FUSE_GETLK = 31
    FUSE_SETLK = 32
    FUSE_SETLKW = 33
    FUSE_ACCESS = 34
    FUSE_CREATE = 35
    FUSE_INTERRUPT = 36
    FUSE_BMAP = 37
    FUSE_DESTROY = 38
    FUSE_IOCTL = 39
    FUSE_POLL = 40
    FUSE_NOTIFY_REPLY = 41
    FUSE_BATCH_FORGET = 42
    FUSE_FALLOCATE = 43
    FUSE_READDIRPLUS = 44
    FUSE_RENAME2 = 45
    FUSE_LSEEK = 46
    FUSE_COPY_FILE_RANGE = 47
    FUSE_SETUPMAPPING = 48
    FUSE_REMOVEMAPPING = 49
    FUSE_SYNCFS = 50
    FUSE_TMPFILE = 51
    FUSE_STATX = 52


# INIT flags (fuse_init_in.flags / fuse_init_out.flags; bits 32.. go in flags2).
FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_FILE_OPS = 1 << 2
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_SPLICE_WRITE = 1 << 7
FUSE_SPLICE_MOVE = 1 << 8
FUSE_SPLICE_READ = 1 << 9
FUSE_FLOCK_LOCKS = 1 << 10
FUSE_HAS_IOCTL_DIR = 1 << 11
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_NO_OPEN_SUPPORT = 1 << 17
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_POSIX_ACL = 1 << 20
FUSE_ABORT_ERROR = 1 << 21
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
FUSE_NO_OPENDIR_SUPPORT = 1 << 24
FUSE_EXPLICIT_INVAL_DATA = 1 << 25
FUSE_MAP_ALIGNMENT = 1 << 26
FUSE_SUBMOUNTS = 1 << 27
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
FUSE_SETXATTR_EXT = 1 << 29
FUSE_INIT_EXT = 1 << 30
FUSE_INIT_RESERVED = 1 << 31
FUSE_SECURITY_CTX = 1 << 32
FUSE_HAS_INODE_DAX = 1 << 33
#: 7.38 (Linux 6.3): creating ops carry the caller's matching supplementary group.
FUSE_CREATE_SUPP_GROUP = 1 << 34
#: 7.39 (Linux 6.6): shared mmap of files opened FOPEN_DIRECT_IO (virtiofsd's --allow-mmap).
FUSE_DIRECT_IO_ALLOW_MMAP = 1 << 36

# fuse_attr.flags
#: The directory is the root of another mount: the guest mounts it apart (FUSE_SUBMOUNTS).
FUSE_ATTR_SUBMOUNT = 1 << 0

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

FUSE_RELEASE_FLUSH = 1 << 0
FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1
FUSE_GETATTR_FH = 1 << 0
FUSE_LK_FLOCK = 1 << 0
FUSE_WRITE_CACHE = 1 << 0
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_WRITE_KILL_SUIDGID = 1 << 2
FUSE_READ_LOCKOWNER = 1 << 1
FUSE_FSYNC_FDATASYNC = 1 << 0
FUSE_OPEN_KILL_SUIDGID = 1 << 0
FUSE_SETXATTR_ACL_KILL_SGID = 1 << 0
FUSE_SETUPMAPPING_FLAG_WRITE = 1 << 0
FUSE_SETUPMAPPING_FLAG_READ = 1 << 1

# Little-endian layouts.  Names drop the ``struct fuse_`` prefix.
fuse_in_header = struct.Struct("<IIQQIIIHH")
fuse_out_header = struct.Struct("<IiQ")
fuse_attr = struct.Struct("<QQQQQQIIIIIIIIII")
fuse_kstatfs = struct.Struct("<QQQQQIIII24x")
fuse_file_lock = struct.Struct("<QQII")
fuse_entry_out = struct.Struct("<QQQQII" + fuse_attr.format[1:])
fuse_forget_in = struct.Struct("<Q")
fuse_forget_one = struct.Struct("<QQ")
fuse_batch_forget_in = struct.Struct("<II")
fuse_getattr_in = struct.Struct("<IIQ")
fuse_attr_out = struct.Struct("<QII" + fuse_attr.format[1:])
# struct fuse_statx (7.39; 256 bytes, struct statx's layout): mask, blksize,
# attributes, nlink, uid, gid, mode, __spare0, ino, size, blocks,
# attributes_mask, then fuse_sx_time (s64 tv_sec, u32 tv_nsec, s32 reserved)
# for atime, btime, ctime and mtime, rdev_major, rdev_minor, dev_major,
# dev_minor, __spare2[14].
fuse_statx = struct.Struct("<IIQIIIHHQQQQ" + "qIi" * 4 + "IIII112x")
fuse_statx_in = struct.Struct("<IIQII")  # getattr_flags, reserved, fh, sx_flags, sx_mask
fuse_statx_out = struct.Struct("<QII16x" + fuse_statx.format[1:])  # attr_valid, nsec, flags
fuse_mknod_in = struct.Struct("<IIII")
fuse_mkdir_in = struct.Struct("<II")
fuse_rename_in = struct.Struct("<Q")
fuse_rename2_in = struct.Struct("<QII")
fuse_link_in = struct.Struct("<Q")
fuse_setattr_in = struct.Struct("<IIQQQQQQIIIIIIII")
fuse_open_in = struct.Struct("<II")
fuse_create_in = struct.Struct("<IIII")
fuse_open_out = struct.Struct("<QIi")  # fh, open_flags, backing_id (7.40)
fuse_release_in = struct.Struct("<QIIQ")
fuse_flush_in = struct.Struct("<QIIQ")
fuse_read_in = struct.Struct("<QQIIQII")
fuse_write_in = struct.Struct("<QQIIQII")
fuse_write_out = struct.Struct("<II")
fuse_statfs_out = fuse_kstatfs
fuse_fsync_in = struct.Struct("<QII")
fuse_setxattr_in = struct.Struct("<IIII")
fuse_getxattr_in = struct.Struct("<II")
fuse_getxattr_out = struct.Struct("<II")
fuse_lk_in = struct.Struct("<QQQQIIII")
fuse_lk_out = fuse_file_lock
fuse_access_in = struct.Struct("<II")
fuse_init_in = struct.Struct("<IIIII44x")
#: INIT from kernels before 7.36 is only the first four fields.
FUSE_COMPAT_INIT_IN_SIZE = 16
fuse_init_out = struct.Struct("<IIIIHHIIHHII24x")  # ... flags2, max_stack_depth (7.40)
fuse_interrupt_in = struct.Struct("<Q")
fuse_bmap_in = struct.Struct("<QII")
fuse_ioctl_in = struct.Struct("<QIIQII")
fuse_poll_in = struct.Struct("<QQII")
fuse_fallocate_in = struct.Struct("<QQQII")
fuse_dirent = struct.Struct("<QQII")
FUSE_NAME_OFFSET = fuse_dirent.size
fuse_lseek_in = struct.Struct("<QQII")
fuse_lseek_out = struct.Struct("<Q")
fuse_copy_file_range_in = struct.Struct("<QQQQQQQ")
fuse_setupmapping_in = struct.Struct("<QQQQQ")
fuse_removemapping_in = struct.Struct("<I")
fuse_removemapping_one = struct.Struct("<QQ")
#: The fh of a SETUPMAPPING the Linux driver sends: it maps per inode, not per
#: open file (fs/fuse/dax.c fuse_setup_one_mapping: ``inarg.fh = -1``).
FUSE_SETUPMAPPING_NO_FH = 0xFFFF_FFFF_FFFF_FFFF
#: The DAX range the Linux driver maps and unmaps (fs/fuse/dax.c FUSE_DAX_SHIFT):
#: 2 MiB, at window offsets and file offsets that are multiples of it.
FUSE_DAX_SHIFT = 21
#: REMOVEMAPPING entries one request carries at most: the kernel sends up to
#: PAGE_SIZE / sizeof(fuse_removemapping_one), and 64 KiB is the largest page size.
FUSE_REMOVEMAPPING_MAX_ENTRIES = (64 << 10) // fuse_removemapping_one.size
fuse_syncfs_in = struct.Struct("<Q")
#: Request extensions (7.38): after the op's arguments, ``total_extlen`` 8-byte
#: units of records, each starting with this header (size includes it).
fuse_ext_header = struct.Struct("<II")
#: The security-context extension shares the header: ``type`` is the count.
fuse_secctx_header = struct.Struct("<II")
fuse_secctx = struct.Struct("<II")
#: ``struct fuse_supp_groups``: nr_groups, then that many u32 gids.
fuse_supp_groups = struct.Struct("<I")
#: fuse_ext_header.type values; 0..FUSE_MAX_NR_SECCTX mean a security context.
FUSE_MAX_NR_SECCTX = 31
FUSE_EXT_GROUPS = 32
#: direntplus is an entry_out followed by a dirent header and the name.
FUSE_NAME_OFFSET_DIRENTPLUS = fuse_entry_out.size + fuse_dirent.size

#: Sizes that older minors use, kept for the compat rules in INIT.
FUSE_COMPAT_ENTRY_OUT_SIZE = 120
FUSE_COMPAT_ATTR_OUT_SIZE = 96
FUSE_COMPAT_MKNOD_IN_SIZE = 8
FUSE_COMPAT_WRITE_IN_SIZE = 24
FUSE_COMPAT_SETXATTR_IN_SIZE = 8


def fuse_rec_align(n: int) -> int:
    """FUSE_REC_ALIGN: dirent records are padded to 8 bytes."""
    return (n + 7) & ~7
