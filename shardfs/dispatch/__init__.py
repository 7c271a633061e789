"""FUSE dispatch: one request chain in, one reply out.

This is the only package that touches FUSE wire structs above the ABI layer.
A request flows one way, as in virtiofsd's ``Server::handle_message``:
decode ``fuse_in_header``, look the opcode up in :data:`Dispatcher.TABLE`,
decode the op's ``*_in`` struct from the chain stream, call the
:class:`~shardfs.fs.api.FileSystem`, encode the reply into the chain's
writable side, and return the used length.

Error contract (STYLE "Errors"):

* :class:`FsError` and ``OSError`` become ``-errno`` replies.
* A request too short for its struct, an unterminated name or an absurd
  count is malformed guest input: EINVAL, counted in ``malformed``.
* A chain with no room for a reply header, or a header that does not parse,
  is dropped (used length 0) and counted.
* Any other exception is a bug: logged with its traceback, answered EIO,
  counted in ``bugs``.  Nothing a guest sends ends the worker.

The package: this module holds :class:`Dispatcher` and its opcode table;
:mod:`~shardfs.dispatch.fast` the fast paths of the commonest requests,
:mod:`~shardfs.dispatch.replies` reply encoding, limits and counters,
:mod:`~shardfs.dispatch.extensions` the request extensions (security
contexts, supplementary groups), :mod:`~shardfs.dispatch.services` the DAX
window and lock service the dispatcher calls.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.dispatch.extensions import _extension_area, _ns, _secctx, _supp_groups
from shardfs.dispatch.fast import FAST, FastSpec
from shardfs.dispatch.replies import (
    _BATCH_FORGET,
    _FORGET,
    _GETATTR_FH,
    _GETATTR_IN,
    _IN_HEADER,
    _IN_HEADER_SIZE,
    _INTERRUPT,
    _OUT_HEADER,
    _U32,
    _U64,
    EXTENSIONS_MINOR,
    MAX_BATCH_FORGET,
    MAX_CACHED_CONTEXTS,
    MAX_NAME_BYTES,
    MAX_PAGES,
    MAX_READ,
    MAX_WRITE,
    MAX_XATTR_SIZE,
    OUT_HDR,
    PENDING,
    Malformed,
    Stats,
    _pack_entry_out,
    _pack_out,
    _reply_attr,
    _reply_entry,
    _split_timeout,
    _unpack_in,
    attr_fields,
    decode_dev,
    encode_dev,
    pack_attr,
    pack_entry,
)
from shardfs.dispatch.services import DaxMapper, Handler, LockService
from shardfs.fs.api import Context, FileSystem, FsError, SecContext, SetattrIn
from shardfs.fs.locks import Pending
from shardfs.virtq.chain import ChainReader, ChainWriter, DescriptorChain, ShortRead

log = logging.getLogger("shardfs.dispatch")

class Dispatcher:
    """Decodes requests for one FileSystem; one instance per worker process."""

    #: INIT flags we turn on when the guest offers them (as virtiofsd's server
    #: does).  Those an option governs (READDIRPLUS, SUBMOUNTS, writeback...)
    #: are the filesystem's to ask for in ``init``, as in virtiofsd.
    WANTED_INIT_FLAGS = (
        F.FUSE_ASYNC_READ | F.FUSE_PARALLEL_DIROPS | F.FUSE_BIG_WRITES | F.FUSE_AUTO_INVAL_DATA
        | F.FUSE_ASYNC_DIO | F.FUSE_HAS_IOCTL_DIR | F.FUSE_ATOMIC_O_TRUNC | F.FUSE_MAX_PAGES
        | F.FUSE_INIT_EXT
    )

    def __init__(self, fs: FileSystem, dax: DaxMapper | None = None) -> None:
        self.fs = fs
        #: The DAX window, or None: SETUPMAPPING/REMOVEMAPPING answer ENOSYS.
        self.dax = dax
        #: Host-visible locks, or None: GETLK/SETLK/SETLKW answer ENOSYS (set by the worker).
        self.locks: LockService | None = None
        self.stats = Stats()
        self.minor = F.FUSE_KERNEL_MINOR_VERSION
        self.initialized = False
        self._contexts: dict[tuple[int, int, int], Context] = {}

    # -- entry point ------------------------------------------------------------

    def handle(self, chain: DescriptorChain) -> int:
        """Serve one chain; return the used length to put in the used ring.

        The commonest requests (GETATTR, LOOKUP, READ, WRITE) in the shapes
        guests send (header, arguments and reply header each whole in a view)
        take a fast path (:data:`FAST`) that decodes and packs straight on
        the views, without a ChainReader or ChainWriter.  Anything else, and
        any request a fast path does not recognise before it acts, takes the
        general path below; both give the same replies (tests/unit/test_fastpath.py).
        """
        stats = self.stats
        stats.requests += 1
        rbufs = chain.readable
        first = len(rbufs[0]) if rbufs else 0
        if first >= _IN_HEADER_SIZE:  # the header in one view: no stream needed for it
            (length, opcode, unique, nodeid, uid, gid, pid, extlen,
             _pad) = _unpack_in(rbufs[0], 0)
            spec = FAST.get(opcode)
            if spec is not None and not extlen and length <= chain.readable_len:
                # The fast path (see FAST), inlined: where are the arguments and the
                # reply?  None of these shapes: the general path below.
                args_size, reply_size, fn = spec
                wbufs = chain.writable
                if length < _IN_HEADER_SIZE + args_size or not wbufs:
                    av = None  # the general path answers EINVAL, or drops the chain
                elif first > _IN_HEADER_SIZE and first >= _IN_HEADER_SIZE + args_size:
                    av, apos = rbufs[0], _IN_HEADER_SIZE
                elif (first == _IN_HEADER_SIZE and len(rbufs) > 1
                      and len(rbufs[1]) >= args_size):
                    av, apos = rbufs[1], 0
                else:
                    av = None
                if av is not None:
                    w0 = wbufs[0]
                    if len(w0) >= OUT_HDR + reply_size:
                        rv, rpos = w0, OUT_HDR
                    elif (len(w0) == OUT_HDR and len(wbufs) > 1
                          and len(wbufs[1]) >= reply_size):
                        rv, rpos = wbufs[1], 0
                    else:
                        av = None
                if av is not None:
                    key = (uid, gid, pid)
                    ctx = self._contexts.get(key)
                    if ctx is None:
                        ctx = self._context(key)
                    try:
                        n = fn(self, ctx, nodeid, av, apos, length - _IN_HEADER_SIZE, rv, rpos,
                               chain)
                    except Exception as e:
                        chain.materialize()
                        return self._failed(ChainWriter(chain.writable, chain.writable_len),
                                            unique, opcode, e)
                    if n is not None:
                        total = OUT_HDR + n
                        if chain.writable_len < total:
                            stats.dropped += 1
                            return 0
                        _OUT_HEADER.pack_into(w0, 0, total, 0, unique)
                        return total
            if chain.tail is not None:  # the general path reads views only
                chain.materialize()
                rbufs = chain.readable
            r = (ChainReader(rbufs, chain.readable_len - _IN_HEADER_SIZE, 0,
                             _IN_HEADER_SIZE) if first > _IN_HEADER_SIZE
                 else ChainReader(rbufs, chain.readable_len - _IN_HEADER_SIZE, 1))
        else:
            chain.materialize()
            r = ChainReader(chain.readable, chain.readable_len)
            try:
                (length, opcode, unique, nodeid, uid, gid, pid, extlen,
                 _pad) = r.read_struct(_IN_HEADER)
            except ShortRead:
                stats.malformed += 1
                stats.dropped += 1
                log.warning("dropped a chain of %d bytes: too short for fuse_in_header",
                            chain.readable_len)
                return 0
        w = ChainWriter(chain.writable, chain.writable_len)
        body = length - _IN_HEADER_SIZE - 8 * extlen
        if body < 0 or length > chain.readable_len:
            stats.malformed += 1
            log.warning("opcode %d: header len %d does not match the chain (%d bytes)",
                        opcode, length, chain.readable_len)
            return self._reply_error(w, unique, errno.EINVAL, opcode)
        r.remaining = body  # extensions sit after the op's arguments
        if opcode == _FORGET or opcode == _BATCH_FORGET:
            self._forget(opcode, nodeid, r)
            return 0
        if opcode == _INTERRUPT:
            if self.locks is not None:  # only a waiting SETLKW is ever in flight
                self._interrupt(r)
            return 0  # INTERRUPT itself has no reply
        handler = self.TABLE.get(opcode)
        if handler is None:
            return self._reply_error(w, unique, errno.ENOSYS, opcode)
        if w.capacity < OUT_HDR + REPLY_BYTES.get(opcode, 0):
            # Refuse before the filesystem acts: a LOOKUP whose entry cannot
            # be delivered would leave a lookup count the guest never learns.
            stats.malformed += 1
            log.warning("opcode %d: reply buffer of %d bytes is too small", opcode, w.capacity)
            return self._reply_error(w, unique, errno.EINVAL, opcode)
        key = (uid, gid, pid)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._context(key)
        try:
            n = handler(self, ctx, nodeid, r, w)
        except FsError as e:
            return self._reply_error(w, unique, e.errno, opcode)
        except OSError as e:
            return self._reply_error(w, unique, e.errno or errno.EIO, opcode)
        except (ShortRead, Malformed) as e:
            stats.malformed += 1
            log.warning("opcode %d unique %d malformed: %s", opcode, unique, e)
            return self._reply_error(w, unique, errno.EINVAL, opcode)
        except Pending:
            return PENDING
        except Exception:
            stats.bugs += 1
            log.exception("bug while serving opcode %d unique %d", opcode, unique)
            return self._reply_error(w, unique, errno.EIO, opcode)
        total = OUT_HDR + n
        if w.capacity < total:
            stats.dropped += 1
            return 0
        spot = w.span(0, OUT_HDR)
        if spot is None:
            w.write_at(0, _pack_out(total, 0, unique))
        else:
            _OUT_HEADER.pack_into(spot[0], spot[1], total, 0, unique)
        return total

    def _failed(self, w: ChainWriter, unique: int, opcode: int, e: Exception) -> int:
        """The reply to a fast path that raised ``e``: as :meth:`handle`'s except clauses."""
        if isinstance(e, FsError):
            return self._reply_error(w, unique, e.errno, opcode)
        if isinstance(e, OSError):
            return self._reply_error(w, unique, e.errno or errno.EIO, opcode)
        if isinstance(e, (ShortRead, Malformed)):
            self.stats.malformed += 1
            log.warning("opcode %d unique %d malformed: %s", opcode, unique, e)
            return self._reply_error(w, unique, errno.EINVAL, opcode)
        self.stats.bugs += 1
        log.error("bug while serving opcode %d unique %d", opcode, unique, exc_info=e)
        return self._reply_error(w, unique, errno.EIO, opcode)

    def _context(self, key: tuple[int, int, int]) -> Context:
        """The (frozen, shareable) Context for ``key``, kept for the next request.

        Building one costs about 0.4 us (a NamedTuple); a guest has few
        distinct callers, so most requests find theirs here.
        """
        if len(self._contexts) >= MAX_CACHED_CONTEXTS:
            self._contexts.clear()
        ctx = self._contexts[key] = Context(*key)
        return ctx

    def fail(self, chain: DescriptorChain | None, err: int) -> int:
        """Answer ``chain`` with -err without serving it; return the used length.

        For requests a crashed worker took and never completed.  A chain
        without a readable header, or with no room for a reply, gets 0.
        """
        if chain is None:
            return 0
        r = ChainReader(chain.readable, chain.readable_len)
        try:
            _len, opcode, unique, *_ = r.read_struct(F.fuse_in_header)
        except ShortRead:
            return 0
        if opcode in (Op.FUSE_FORGET, Op.FUSE_BATCH_FORGET, Op.FUSE_INTERRUPT):
            return 0
        return self._reply_error(ChainWriter(chain.writable, chain.writable_len), unique, err,
                                 opcode)

    def _reply_error(self, w: ChainWriter, unique: int, err: int, opcode: int) -> int:
        self.stats.errors += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("opcode %d unique %d: errno %d (%s)", opcode, unique, err,
                      errno.errorcode.get(err, "?"))
        if w.capacity < OUT_HDR:
            self.stats.dropped += 1
            log.warning("opcode %d: no room for a reply header; dropped", opcode)
            return 0
        w.write_at(0, _pack_out(OUT_HDR, -err, unique))
        return OUT_HDR

    # -- helpers --------------------------------------------------------------

    @staticmethod
    def _name(r: ChainReader) -> bytes:
        """One NUL-terminated name from the rest of the request."""
        data = r.read_bytes(min(r.remaining, MAX_NAME_BYTES))
        end = data.find(b"\0")
        if end < 0:
            raise Malformed("name is not NUL-terminated")
        return data[:end]

    @staticmethod
    def _two_names(r: ChainReader) -> tuple[bytes, bytes]:
        data = r.read_bytes(min(r.remaining, 2 * MAX_NAME_BYTES))
        parts = data.split(b"\0", 2)
        if len(parts) < 3:
            raise Malformed("expected two NUL-terminated names")
        return parts[0], parts[1]

    @staticmethod
    def _reply(w: ChainWriter, data: bytes | memoryview) -> int:
        w.write_at(OUT_HDR, data)
        return len(data)

    def _forget(self, opcode: int, nodeid: int, r: ChainReader) -> None:
        try:
            if opcode == Op.FUSE_FORGET:
                (nlookup,) = r.read_struct(F.fuse_forget_in)
                self.fs.forget(nodeid, nlookup)
                if self.dax is not None:
                    self.dax.forgotten([nodeid])
                return
            count, _ = r.read_struct(F.fuse_batch_forget_in)
            if count > MAX_BATCH_FORGET or count * F.fuse_forget_one.size > r.remaining:
                raise Malformed(f"BATCH_FORGET count {count} exceeds the request")
            nids = []
            for _ in range(count):
                nid, n = r.read_struct(F.fuse_forget_one)
                self.fs.forget(nid, n)
                nids.append(nid)
            if self.dax is not None:
                self.dax.forgotten(nids)
        except (ShortRead, Malformed) as e:
            self.stats.malformed += 1
            log.warning("malformed FORGET: %s", e)
        except Exception:
            self.stats.bugs += 1
            log.exception("bug while serving FORGET")

    # -- operations (names follow FUSE opcodes) -------------------------------

    def op_init(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        if r.remaining < F.FUSE_COMPAT_INIT_IN_SIZE:
            raise Malformed("INIT too short")
        raw = r.read_bytes(min(r.remaining, F.fuse_init_in.size)).ljust(F.fuse_init_in.size,
                                                                         b"\0")
        major, minor, max_readahead, flags, flags2 = F.fuse_init_in.unpack(raw)
        if major < F.FUSE_KERNEL_VERSION:
            raise FsError(errno.EPROTO)
        if major > F.FUSE_KERNEL_VERSION:
            # Ask the kernel to retry with our major (fuse.h "INIT request/reply").
            return self._reply(w, F.fuse_init_out.pack(F.FUSE_KERNEL_VERSION, 0, 0, 0, 0, 0, 0,
                                                       0, 0, 0, 0, 0)[:8])
        if minor < F.FUSE_MIN_MINOR_VERSION:
            log.error("guest FUSE 7.%d is older than 7.%d", minor, F.FUSE_MIN_MINOR_VERSION)
            raise FsError(errno.EPROTO)
        # The session is shared by every queue: a reboot's INIT may reach a worker
        # that never saw the first one, so ask the filesystem too.
        if self.initialized or self.fs.session_flags():
            log.info("INIT again without DESTROY (guest reboot): dropping all nodes")
            self.fs.destroy()
            if self.dax is not None:
                self.dax.destroy()
            if self.locks is not None:
                self.locks.destroy()
        capable = flags | ((flags2 << 32) if flags & F.FUSE_INIT_EXT else 0)
        # The filesystem asks for what changes its semantics (writeback, ACLs...).
        # With a DAX window, map_alignment tells the guest our mmap granularity.
        dax_flags = F.FUSE_MAP_ALIGNMENT if self.dax is not None else 0
        if self.locks is not None:
            dax_flags |= self.locks.init_flags
        enabled = capable & (self.WANTED_INIT_FLAGS | self.fs.init(capable) | dax_flags)
        map_alignment = (self.dax.map_alignment_log2
                         if self.dax is not None and enabled & F.FUSE_MAP_ALIGNMENT else 0)
        if minor < EXTENSIONS_MINOR:
            # Before 7.38 a security context rode after the name, not as an extension.
            enabled &= ~(F.FUSE_SECURITY_CTX | F.FUSE_CREATE_SUPP_GROUP)
        self.fs.negotiated(enabled)
        self.minor = min(minor, F.FUSE_KERNEL_MINOR_VERSION)
        self.initialized = True
        log.info("FUSE INIT: guest 7.%d, speaking 7.%d, flags %#x", minor, self.minor, enabled)
        out = F.fuse_init_out.pack(
            F.FUSE_KERNEL_VERSION, self.minor, max_readahead, enabled & _U32,
            0, 0, MAX_WRITE, 1, MAX_PAGES, map_alignment, enabled >> 32, 0)
        return self._reply(w, out)

    def op_destroy(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        self.fs.destroy()
        if self.locks is not None:
            self.locks.destroy()
        if self.dax is not None:
            self.dax.destroy()
        self.initialized = False
        return 0

    def op_lookup(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        name = self._name(r)
        return _reply_entry(w, self.fs.lookup(ctx, nodeid, name))

    def op_getattr(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        flags, _, fh = r.read_struct(_GETATTR_IN)
        st, timeout = self.fs.getattr(ctx, nodeid, fh if flags & _GETATTR_FH else None)
        return _reply_attr(w, st, timeout)

    def op_statx(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        """FUSE_STATX: fuse_statx_in, answered with fuse_statx_out (the host's
        statx, birth time included).  The host's dev numbers are not sent."""
        getattr_flags, _, fh, sx_flags, sx_mask = r.read_struct(F.fuse_statx_in)
        sx, timeout = self.fs.statx(ctx, nodeid, fh if getattr_flags & _GETATTR_FH else None,
                                    sx_flags, sx_mask)
        av, ans = _split_timeout(timeout)
        return self._reply(w, F.fuse_statx_out.pack(
            av, ans, 0, sx.mask, sx.blksize, sx.attributes, sx.nlink, sx.uid, sx.gid,
            sx.mode & 0xFFFF, 0, sx.ino, sx.size, sx.blocks, sx.attributes_mask,
            sx.atime[0], sx.atime[1], 0, sx.btime[0], sx.btime[1], 0, sx.ctime[0], sx.ctime[1],
            0, sx.mtime[0], sx.mtime[1], 0, sx.rdev_major, sx.rdev_minor, 0, 0))

    def op_setattr(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        (valid, _, fh, size, _lock, atime, mtime, _ctime, atimensec, mtimensec, _ctimensec,
         mode, _, uid, gid, _) = r.read_struct(F.fuse_setattr_in)
        attr = SetattrIn(valid, fh, size, _ns(atime, atimensec), _ns(mtime, mtimensec), mode,
                         uid, gid)
        st, timeout = self.fs.setattr(ctx, nodeid, attr)
        return self._reply(w, pack_attr(st, timeout))

    def op_readlink(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        return self._reply(w, self.fs.readlink(ctx, nodeid))

    def op_symlink(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        name, target = self._two_names(r)
        ctx = self._creating_ctx(ctx, r)
        return self._reply(w, pack_entry(self.fs.symlink(ctx, nodeid, name, target)))

    def op_mknod(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        mode, rdev, umask, _ = r.read_struct(F.fuse_mknod_in)
        name = self._name(r)
        ctx = self._creating_ctx(ctx, r)
        e = self.fs.mknod(ctx, nodeid, name, mode, decode_dev(rdev), umask)
        return self._reply(w, pack_entry(e))

    def op_mkdir(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        mode, umask = r.read_struct(F.fuse_mkdir_in)
        name = self._name(r)
        ctx = self._creating_ctx(ctx, r)
        return self._reply(w, pack_entry(self.fs.mkdir(ctx, nodeid, name, mode, umask)))

    def op_unlink(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        self.fs.unlink(ctx, nodeid, self._name(r))
        return 0

    def op_rmdir(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        self.fs.rmdir(ctx, nodeid, self._name(r))
        return 0

    def op_rename(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        (newdir,) = r.read_struct(F.fuse_rename_in)
        old, new = self._two_names(r)
        self.fs.rename(ctx, nodeid, old, newdir, new, 0)
        return 0

    def op_rename2(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        newdir, flags, _ = r.read_struct(F.fuse_rename2_in)
        old, new = self._two_names(r)
        self.fs.rename(ctx, nodeid, old, newdir, new, flags)
        return 0

    def op_link(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        (oldnodeid,) = r.read_struct(F.fuse_link_in)
        name = self._name(r)
        return self._reply(w, pack_entry(self.fs.link(ctx, oldnodeid, nodeid, name)))

    def op_open(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        flags, open_flags = r.read_struct(F.fuse_open_in)
        o = self.fs.open(ctx, nodeid, flags,
                         kill_suidgid=bool(open_flags & F.FUSE_OPEN_KILL_SUIDGID))
        return self._reply(w, F.fuse_open_out.pack(o.fh, o.open_flags, 0))

    def op_opendir(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        flags, _open_flags = r.read_struct(F.fuse_open_in)
        o = self.fs.opendir(ctx, nodeid, flags)
        return self._reply(w, F.fuse_open_out.pack(o.fh, o.open_flags, 0))

    def op_create(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        flags, mode, umask, open_flags = r.read_struct(F.fuse_create_in)
        name = self._name(r)
        ctx = self._creating_ctx(ctx, r)
        e, o = self.fs.create(ctx, nodeid, name, flags, mode, umask,
                              kill_suidgid=bool(open_flags & F.FUSE_OPEN_KILL_SUIDGID))
        return self._reply(w, pack_entry(e) + F.fuse_open_out.pack(o.fh, o.open_flags, 0))

    def op_tmpfile(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        """FUSE_TMPFILE (7.37): fuse_create_in, then a name the kernel fills
        with "/" and that names nothing; it is ignored, as libfuse does."""
        flags, mode, umask, _open_flags = r.read_struct(F.fuse_create_in)
        ctx = self._creating_ctx(ctx, r)
        e, o = self.fs.tmpfile(ctx, nodeid, flags, mode, umask)
        return self._reply(w, pack_entry(e) + F.fuse_open_out.pack(o.fh, o.open_flags, 0))

    def _creating_ctx(self, ctx: Context, r: ChainReader) -> Context:
        """``ctx`` with the request extensions of a creating op, where negotiated.

        FUSE_EXT_GROUPS becomes ``supp_groups`` (with FUSE_CREATE_SUPP_GROUP)
        and a security-context extension ``secctx`` (with FUSE_SECURITY_CTX);
        other extension types are skipped, as newer kernels may add some.
        Every length is checked against the extension area: Malformed.
        """
        flags = self.fs.session_flags()
        if not flags & (F.FUSE_SECURITY_CTX | F.FUSE_CREATE_SUPP_GROUP):
            return ctx
        data = _extension_area(r)
        groups: tuple[int, ...] = ()
        secctx: tuple[SecContext, ...] = ()
        pos = 0
        while pos < len(data):
            if pos + F.fuse_ext_header.size > len(data):
                raise Malformed("extension header truncated")
            size, typ = F.fuse_ext_header.unpack_from(data, pos)
            if size < F.fuse_ext_header.size or size % 8 or pos + size > len(data):
                raise Malformed(f"extension of {size} bytes at {pos} of {len(data)}")
            body = data[pos + F.fuse_ext_header.size:pos + size]
            if typ <= F.FUSE_MAX_NR_SECCTX and flags & F.FUSE_SECURITY_CTX:
                secctx = _secctx(body, typ)
            elif typ == F.FUSE_EXT_GROUPS and flags & F.FUSE_CREATE_SUPP_GROUP:
                groups = _supp_groups(body)
            pos += size
        if not groups and not secctx:
            return ctx
        return ctx._replace(supp_groups=groups, secctx=secctx)

    def op_read(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        fh, offset, size, _rflags, _owner, _flags, _ = r.read_struct(F.fuse_read_in)
        if size > MAX_READ:
            raise Malformed(f"READ of {size} bytes exceeds {MAX_READ}")
        if offset > _U64 >> 1:
            raise FsError(errno.EINVAL)
        bufs = w.views_at(OUT_HDR, size)
        n = self.fs.read(ctx, nodeid, fh, offset, bufs)
        self.stats.bytes_read += n
        return n

    def op_write(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        fh, offset, size, write_flags, _owner, _flags, _ = r.read_struct(F.fuse_write_in)
        if size > MAX_WRITE or size > r.remaining:
            raise Malformed(f"WRITE of {size} bytes with {r.remaining} in the request")
        if offset > _U64 >> 1:
            raise FsError(errno.EINVAL)
        n = self.fs.write(ctx, nodeid, fh, offset, r.take(size), write_flags)
        self.stats.bytes_written += n
        return self._reply(w, F.fuse_write_out.pack(n, 0))

    def op_statfs(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        s = self.fs.statfs(ctx, nodeid)
        return self._reply(w, F.fuse_kstatfs.pack(
            s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize,
            s.f_namemax, s.f_frsize, 0))

    def op_release(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        fh, _flags, rflags, owner = r.read_struct(F.fuse_release_in)
        self.fs.release(ctx, nodeid, fh)
        if self.dax is not None:
            self.dax.released(nodeid, fh)
        if self.locks is not None:
            self.locks.release(nodeid, owner, bool(rflags & F.FUSE_RELEASE_FLOCK_UNLOCK))
        return 0

    def op_setupmapping(self, ctx: Context, nodeid: int, r: ChainReader,
                        w: ChainWriter) -> int:
        """FUSE_SETUPMAPPING: map a file range into the DAX window (proc.coordinator)."""
        if self.dax is None:
            raise FsError(errno.ENOSYS)
        fh, foffset, length, flags, moffset = r.read_struct(F.fuse_setupmapping_in)
        self.dax.setup(nodeid, fh, foffset, length, flags, moffset)
        return 0

    def op_removemapping(self, ctx: Context, nodeid: int, r: ChainReader,
                         w: ChainWriter) -> int:
        """FUSE_REMOVEMAPPING: ``count`` (moffset, len) pairs; the count is bounded
        by the request's length and by what any kernel sends."""
        if self.dax is None:
            raise FsError(errno.ENOSYS)
        (count,) = r.read_struct(F.fuse_removemapping_in)
        one = F.fuse_removemapping_one
        if not 0 < count <= F.FUSE_REMOVEMAPPING_MAX_ENTRIES or count * one.size > r.remaining:
            raise Malformed(f"REMOVEMAPPING of {count} entries in {r.remaining} bytes")
        self.dax.remove([r.read_struct(one) for _ in range(count)])
        return 0

    def op_releasedir(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        fh, _flags, _rflags, _owner = r.read_struct(F.fuse_release_in)
        self.fs.releasedir(ctx, nodeid, fh)
        return 0

    def op_flush(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        fh, _, _, owner = r.read_struct(F.fuse_flush_in)
        self.fs.flush(ctx, nodeid, fh)
        if self.locks is not None:
            self.locks.flush(nodeid, owner)  # a close drops the owner's POSIX locks
        return 0

    def op_fsync(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        fh, fsync_flags, _ = r.read_struct(F.fuse_fsync_in)
        self.fs.fsync(ctx, nodeid, fh, bool(fsync_flags & F.FUSE_FSYNC_FDATASYNC))
        return 0

    def op_fsyncdir(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        fh, fsync_flags, _ = r.read_struct(F.fuse_fsync_in)
        self.fs.fsyncdir(ctx, nodeid, fh, bool(fsync_flags & F.FUSE_FSYNC_FDATASYNC))
        return 0

    def op_access(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        mask, _ = r.read_struct(F.fuse_access_in)
        self.fs.access(ctx, nodeid, mask)
        return 0

    def op_fallocate(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        fh, offset, length, mode, _ = r.read_struct(F.fuse_fallocate_in)
        if offset > _U64 >> 1 or length > _U64 >> 1:
            raise FsError(errno.EINVAL)
        self.fs.fallocate(ctx, nodeid, fh, offset, length, mode)
        return 0

    def op_lseek(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        fh, offset, whence, _ = r.read_struct(F.fuse_lseek_in)
        if offset > _U64 >> 1:
            raise FsError(errno.EINVAL)
        pos = self.fs.lseek(ctx, nodeid, fh, offset, whence)
        return self._reply(w, F.fuse_lseek_out.pack(pos))

    def op_syncfs(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        self.fs.syncfs(ctx, nodeid)
        return 0

    def op_getxattr(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        size, _ = r.read_struct(F.fuse_getxattr_in)
        name = self._name(r)
        return self._xattr_reply(w, self.fs.getxattr(ctx, nodeid, name, min(size,
                                                                                MAX_XATTR_SIZE)))

    def op_listxattr(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        size, _ = r.read_struct(F.fuse_getxattr_in)
        return self._xattr_reply(w, self.fs.listxattr(ctx, nodeid, min(size, MAX_XATTR_SIZE)))

    def _xattr_reply(self, w: ChainWriter, value: bytes | int) -> int:
        if isinstance(value, int):
            return self._reply(w, F.fuse_getxattr_out.pack(value, 0))
        return self._reply(w, value)

    def op_setxattr(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        """SETXATTR: the 16-byte fuse_setxattr_in once FUSE_SETXATTR_EXT is
        negotiated (its setxattr_flags carry ACL_KILL_SGID), the 8-byte one before."""
        setxattr_flags = 0
        if self.fs.session_flags() & F.FUSE_SETXATTR_EXT:
            size, flags, setxattr_flags, _ = r.read_struct(F.fuse_setxattr_in)
        else:
            size, flags = F.fuse_getxattr_in.unpack(
                r.read_bytes(F.FUSE_COMPAT_SETXATTR_IN_SIZE))
        if size > MAX_XATTR_SIZE:
            raise FsError(errno.E2BIG)
        data = r.read_bytes(r.remaining)
        end = data.find(b"\0")
        if end < 0 or len(data) - end - 1 < size:
            raise Malformed("SETXATTR name or value truncated")
        value = data[end + 1:end + 1 + size]
        self.fs.setxattr(ctx, nodeid, data[:end], value, flags, setxattr_flags)
        return 0

    def op_removexattr(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        self.fs.removexattr(ctx, nodeid, self._name(r))
        return 0

    def op_copy_file_range(self, ctx: Context, nodeid: int, r: ChainReader,
                           w: ChainWriter) -> int:
        (fh_in, off_in, nodeid_out, fh_out, off_out, length,
         flags) = r.read_struct(F.fuse_copy_file_range_in)
        if max(off_in, off_out, length) > _U64 >> 1:
            raise FsError(errno.EINVAL)
        n = self.fs.copy_file_range(ctx, nodeid, fh_in, off_in, nodeid_out, fh_out, off_out,
                                    length, flags)
        return self._reply(w, F.fuse_write_out.pack(n, 0))

    def op_readdir(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        return self._readdir(ctx, nodeid, r, w, plus=False)

    def op_readdirplus(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        return self._readdir(ctx, nodeid, r, w, plus=True)

    def _readdir(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter,
                 plus: bool) -> int:
        """READDIR(PLUS): pack records until the guest's buffer is full.

        With PLUS, every record except ``.`` and ``..`` carries an entry and
        counts as a lookup in the guest (``fuse_direntplus_link``), so the
        lookup happens only once the record is known to fit.  A name that no
        longer resolves is sent with nodeid 0, which the kernel skips.
        """
        fh, offset, size, *_ = r.read_struct(F.fuse_read_in)
        size = min(size, MAX_READ, max(w.capacity - OUT_HDR, 0))
        # Records are packed in place into a zeroed buffer: padding, and the
        # empty entry of ".", ".." and names gone meanwhile, are its zeros.
        buf = bytearray(size)
        if not plus:
            packed = self.fs.readdir_packed(ctx, nodeid, fh, offset, buf)
            if packed is not None:
                return self._reply(w, memoryview(buf)[:packed]) if packed else 0
        pos = 0
        hdr_size = F.FUSE_NAME_OFFSET_DIRENTPLUS if plus else F.FUSE_NAME_OFFSET
        name_at = F.FUSE_NAME_OFFSET
        entry_size = hdr_size - name_at
        pack_dirent = F.fuse_dirent.pack_into
        lookup = self.fs.lookup
        for ino, cookie, typ, name in self.fs.readdir(ctx, nodeid, fh, offset):
            n = len(name)
            rec = (hdr_size + n + 7) & ~7  # fuse_rec_align, inlined
            if pos + rec > size:
                break
            if plus and name != b"." and name != b"..":
                try:
                    _pack_entry_out(buf, pos, lookup(ctx, nodeid, name))
                except (FsError, OSError):
                    pass
            at = pos + entry_size
            pack_dirent(buf, at, ino, cookie, n, typ)
            at += name_at
            buf[at:at + n] = name
            pos += rec
        return self._reply(w, memoryview(buf)[:pos]) if pos else 0

    def op_ioctl(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        raise FsError(errno.ENOTTY)

    # -- locks (shardfs.proc.locks has the rules) ------------------------------------------

    def _lock_args(self, ctx: Context, nodeid: int,
                   r: ChainReader) -> tuple[LockService, Callable[[bool], int | None], tuple[
                       int, int, int, int, int, int, int]]:
        """fuse_lk_in: (service, fh checker/opener, (fh, owner, start, end, type, pid, flags))."""
        if self.locks is None:
            raise FsError(errno.ENOSYS)
        fh, owner, start, end, typ, pid, lk_flags, _ = r.read_struct(F.fuse_lk_in)
        fs = self.fs

        def open_fd(reopen: bool) -> int | None:
            return fs.lock_file(ctx, nodeid, fh, reopen)

        return self.locks, open_fd, (fh, owner, start, end, typ, pid, lk_flags)

    def op_getlk(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        locks, open_fd, (_fh, owner, start, end, typ, _pid, _) = self._lock_args(ctx, nodeid, r)
        got_typ, got_start, got_end, got_pid = locks.getlk(open_fd, nodeid, owner, start, end,
                                                           typ)
        return self._reply(w, F.fuse_lk_out.pack(got_start, got_end, got_typ, got_pid))

    def op_setlk(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        return self._setlk(ctx, nodeid, r, 0)

    def op_setlkw(self, ctx: Context, nodeid: int, r: ChainReader, w: ChainWriter) -> int:
        whole = ChainReader(r._bufs, sum(len(b) for b in r._bufs))
        unique = whole.read_struct(F.fuse_in_header)[2]
        return self._setlk(ctx, nodeid, r, unique or _U64)

    def _setlk(self, ctx: Context, nodeid: int, r: ChainReader, wait_unique: int) -> int:
        locks, open_fd, (_fh, owner, start, end, typ, pid, flags) = self._lock_args(ctx, nodeid,
                                                                                  r)
        locks.setlk(open_fd, nodeid, owner, bool(flags & F.FUSE_LK_FLOCK), start, end, typ, pid,
                    wait_unique)
        return 0

    def _interrupt(self, r: ChainReader) -> None:
        assert self.locks is not None
        try:
            (unique,) = r.read_struct(F.fuse_interrupt_in)
        except ShortRead:
            self.stats.malformed += 1
            return
        self.locks.interrupt(unique)

    TABLE: dict[int, Handler] = {}


#: Fixed reply sizes of ops whose effect must not happen unless the reply fits.
REPLY_BYTES = {
    Op.FUSE_LOOKUP: F.fuse_entry_out.size,
    Op.FUSE_MKNOD: F.fuse_entry_out.size,
    Op.FUSE_MKDIR: F.fuse_entry_out.size,
    Op.FUSE_SYMLINK: F.fuse_entry_out.size,
    Op.FUSE_LINK: F.fuse_entry_out.size,
    Op.FUSE_CREATE: F.fuse_entry_out.size + F.fuse_open_out.size,
    Op.FUSE_TMPFILE: F.fuse_entry_out.size + F.fuse_open_out.size,
    Op.FUSE_OPEN: F.fuse_open_out.size,
    Op.FUSE_OPENDIR: F.fuse_open_out.size,
    Op.FUSE_GETATTR: F.fuse_attr_out.size,
    Op.FUSE_STATX: F.fuse_statx_out.size,
    Op.FUSE_SETATTR: F.fuse_attr_out.size,
    Op.FUSE_WRITE: F.fuse_write_out.size,
    Op.FUSE_INIT: F.fuse_init_out.size,
    Op.FUSE_GETLK: F.fuse_lk_out.size,
}


Dispatcher.TABLE = {
    Op.FUSE_INIT: Dispatcher.op_init,
    Op.FUSE_DESTROY: Dispatcher.op_destroy,
    Op.FUSE_LOOKUP: Dispatcher.op_lookup,
    Op.FUSE_GETATTR: Dispatcher.op_getattr,
    Op.FUSE_STATX: Dispatcher.op_statx,
    Op.FUSE_SETATTR: Dispatcher.op_setattr,
    Op.FUSE_READLINK: Dispatcher.op_readlink,
    Op.FUSE_SYMLINK: Dispatcher.op_symlink,
    Op.FUSE_MKNOD: Dispatcher.op_mknod,
    Op.FUSE_MKDIR: Dispatcher.op_mkdir,
    Op.FUSE_UNLINK: Dispatcher.op_unlink,
    Op.FUSE_RMDIR: Dispatcher.op_rmdir,
    Op.FUSE_RENAME: Dispatcher.op_rename,
    Op.FUSE_RENAME2: Dispatcher.op_rename2,
    Op.FUSE_LINK: Dispatcher.op_link,
    Op.FUSE_OPEN: Dispatcher.op_open,
    Op.FUSE_OPENDIR: Dispatcher.op_opendir,
    Op.FUSE_CREATE: Dispatcher.op_create,
    Op.FUSE_READ: Dispatcher.op_read,
    Op.FUSE_WRITE: Dispatcher.op_write,
    Op.FUSE_STATFS: Dispatcher.op_statfs,
    Op.FUSE_RELEASE: Dispatcher.op_release,
    Op.FUSE_RELEASEDIR: Dispatcher.op_releasedir,
    Op.FUSE_FLUSH: Dispatcher.op_flush,
    Op.FUSE_FSYNC: Dispatcher.op_fsync,
    Op.FUSE_FSYNCDIR: Dispatcher.op_fsyncdir,
    Op.FUSE_ACCESS: Dispatcher.op_access,
    Op.FUSE_FALLOCATE: Dispatcher.op_fallocate,
    Op.FUSE_LSEEK: Dispatcher.op_lseek,
    Op.FUSE_SYNCFS: Dispatcher.op_syncfs,
    Op.FUSE_GETXATTR: Dispatcher.op_getxattr,
    Op.FUSE_LISTXATTR: Dispatcher.op_listxattr,
    Op.FUSE_SETXATTR: Dispatcher.op_setxattr,
    Op.FUSE_REMOVEXATTR: Dispatcher.op_removexattr,
    Op.FUSE_COPY_FILE_RANGE: Dispatcher.op_copy_file_range,
    Op.FUSE_READDIR: Dispatcher.op_readdir,
    Op.FUSE_READDIRPLUS: Dispatcher.op_readdirplus,
    Op.FUSE_IOCTL: Dispatcher.op_ioctl,
    Op.FUSE_TMPFILE: Dispatcher.op_tmpfile,
    Op.FUSE_SETUPMAPPING: Dispatcher.op_setupmapping,
    Op.FUSE_REMOVEMAPPING: Dispatcher.op_removemapping,
    Op.FUSE_GETLK: Dispatcher.op_getlk,
    Op.FUSE_SETLK: Dispatcher.op_setlk,
    Op.FUSE_SETLKW: Dispatcher.op_setlkw,
}

__all__ = ["FAST", "MAX_BATCH_FORGET", "MAX_PAGES", "MAX_READ", "MAX_WRITE", "PENDING",
           "DaxMapper", "Dispatcher", "FastSpec", "LockService", "Malformed", "Stats",
           "attr_fields", "decode_dev", "encode_dev", "pack_attr", "pack_entry"]
