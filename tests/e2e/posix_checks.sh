#!/bin/sh
# posix_checks.sh DIR: probe POSIX file-system behaviour under DIR and print it
# deterministically, one "[section] check: result" line per probe.
#
# tests/e2e/test_posix_diff.py runs this twice, as root: directly on the host
# (a directory on the same filesystem as the share) and inside a guest on the
# shardfs mount, then compares the two outputs line by line.  So nothing
# printed may depend on where it ran: no inode numbers (only "same"/"other"),
# no times except ones the script set itself (and "advanced"/"now" verdicts),
# errors as errno names or strerror texts, listings sorted.
#
# Needs: coreutils, util-linux (setpriv, fallocate), attr, acl, /usr/bin/python3.
# (fallocate's keep-size flag is -n; -k does not exist.)
# uid 1000 and gids 1000/2000 stand for unprivileged callers (no passwd entry
# needed: setpriv takes numbers).
set -u
umask 022
export TZ=UTC LC_ALL=C.UTF-8
D=${1:?usage: posix_checks.sh DIR}
cd "$D" || exit 1
PY="/usr/bin/python3 -I -S"
SEC=setup

out() { printf '[%s] %s\n' "$SEC" "$*"; }
# t LABEL CMD...: run CMD, print "ok" or the strerror text of its failure.
t() {
    _label=$1; shift
    if _err=$("$@" 2>&1 >/dev/null); then
        out "$_label: ok"
    else
        out "$_label: ${_err##*: }"
    fi
}
# as1000 CMD...: run CMD as uid 1000, gid 1000, no supplementary groups.
as1000() { setpriv --reuid 1000 --regid 1000 --clear-groups -- "$@"; }
st() { stat -c "$1" -- "$2"; }
# A pause longer than a coarse clock tick, so a ctime or mtime change shows.
tick() { sleep 0.05; }

# ---------------------------------------------------------------- errors
# One Python run for the probes that need a system call's errno, with flags
# coreutils cannot pass (renameat2, utimensat with UTIME_OMIT, O_NOFOLLOW...).
$PY - <<'EOF'
import ctypes, errno, os, stat, time
libc = ctypes.CDLL(None, use_errno=True)
SEC = "errno"

def out(s):
    print(f"[{SEC}] {s}", flush=True)

def t(label, fn, *a):
    try:
        r = fn(*a)
    except OSError as x:
        out(f"{label}: {errno.errorcode.get(x.errno, x.errno)}")
    else:
        out(f"{label}: ok" if r is None or isinstance(r, int) else f"{label}: {r}")

def sys_ok(r):
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

def renameat2(a, b, flags):
    sys_ok(libc.renameat2(-100, a.encode(), -100, b.encode(), flags))

def create(p, data=b""):
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.close(fd)

def read(p):
    with open(p, "rb") as f:
        return f.read()

def ino(p):
    return os.lstat(p).st_ino

os.mkdir("e")
os.chdir("e")
os.mkdir("d")
create("d/inner")
os.mkdir("empty")
create("f", b"file")
os.symlink("f", "sl")
os.symlink("loop2", "loop1")
os.symlink("loop1", "loop2")
t("mkdir existing", os.mkdir, "d")
t("mkdir over symlink", os.mkdir, "sl")
t("open O_CREAT|O_EXCL existing", os.open, "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
t("open missing", os.open, "missing", os.O_RDONLY)
t("open through a file", os.open, "f/x", os.O_RDONLY)
t("open dir for writing", os.open, "d", os.O_WRONLY)
t("open O_DIRECTORY on file", os.open, "f", os.O_RDONLY | os.O_DIRECTORY)
t("open O_NOFOLLOW on symlink", os.open, "sl", os.O_RDONLY | os.O_NOFOLLOW)
t("open symlink loop", os.open, "loop1", os.O_RDONLY)
t("stat symlink loop", os.stat, "loop1")
t("rmdir non-empty", os.rmdir, "d")
t("rmdir file", os.rmdir, "f")
t("rmdir dot", os.rmdir, "d/.")
t("unlink dir", os.unlink, "d")
t("unlink missing", os.unlink, "missing")
t("link to dir", os.link, "d", "dlink")
t("link onto existing", os.link, "f", "d/inner")
t("symlink onto existing", os.symlink, "x", "f")
t("name of 255 bytes", create, "n" * 255)
t("name of 256 bytes", create, "n" * 256)
t("symlink target of 4095 bytes", os.symlink, "t" * 4095, "long_target")
t("readlink length", lambda: f"{len(os.readlink('long_target'))}")
t("lstat size of symlink", lambda: f"{os.lstat('long_target').st_size}")
t("symlink target of 4096 bytes", os.symlink, "t" * 4096, "too_long_target")
t("readlink on file", os.readlink, "f")
t("read a dir", lambda: os.read(os.open("d", os.O_RDONLY), 10))
fd = os.open("f", os.O_RDONLY)
t("write to O_RDONLY fd", os.write, fd, b"x")
os.close(fd)
t("rename into own subdir", os.rename, "d", "d/sub")
t("rename dir over non-empty dir", os.rename, "empty", "d")
os.mkdir("empty2")
t("rename dir over empty dir", os.rename, "empty2", "empty")
t("rename file over dir", os.rename, "f", "empty")
t("rename dir over file", os.rename, "empty", "f")
t("rename missing", os.rename, "missing", "x")
t("rename to /dev/shm", os.rename, "f", "/dev/shm/posix-checks-exdev")
t("link to /dev/shm", os.link, "f", "/dev/shm/posix-checks-exdev")
# Two links to one file: rename(2) does nothing and both names stay.
os.link("f", "f_hard")
t("rename hard link onto its sibling", os.rename, "f_hard", "f")
out(f"both names stay: {os.path.exists('f_hard') and os.path.exists('f')}")
os.unlink("f_hard")
# renameat2 flags
create("a", b"A")
create("b", b"B")
a_ino, b_ino = ino("a"), ino("b")
t("RENAME_NOREPLACE onto existing", renameat2, "a", "b", 1)
t("RENAME_NOREPLACE to a new name", renameat2, "a", "a2", 1)
t("RENAME_EXCHANGE", renameat2, "a2", "b", 2)
out(f"exchanged contents: a2={read('a2')!r} b={read('b')!r}")
out(f"exchanged inodes: {ino('a2') == b_ino and ino('b') == a_ino}")
t("RENAME_EXCHANGE with missing", renameat2, "a2", "missing", 2)
t("RENAME_EXCHANGE dir and file", renameat2, "d", "b", 2)
out(f"after dir/file exchange: b is dir {os.path.isdir('b')}, d is file {os.path.isfile('d')}")
t("RENAME_NOREPLACE|EXCHANGE", renameat2, "a2", "b", 3)
old = ino("a2")
create("c", b"C")
os.rename("a2", "c")
out(f"rename over file: target is the source inode {ino('c') == old}, content {read('c')!r}")
# utimensat: UTIME_NOW and UTIME_OMIT
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2

class TS(ctypes.Structure):
    _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]

def utimensat(p, at, mt, flags=0):
    ts = (TS * 2)(TS(*at), TS(*mt))
    sys_ok(libc.utimensat(-100, p.encode(), ts, flags))

create("tm")
os.utime("tm", ns=(981173106_123456789, 981173106_987654321))
st = os.stat("tm")
out(f"utime ns: atime {st.st_atime_ns} mtime {st.st_mtime_ns}")
utimensat("tm", (0, UTIME_OMIT), (1_000_000_000, 5))
st = os.stat("tm")
out(f"UTIME_OMIT atime: atime {st.st_atime_ns} mtime {st.st_mtime_ns}")
before = time.time()
utimensat("tm", (0, UTIME_NOW), (0, UTIME_OMIT))
st = os.stat("tm")
out(f"UTIME_NOW atime, UTIME_OMIT mtime: atime now {abs(st.st_atime - before) < 30} "
    f"mtime {st.st_mtime_ns}")
os.utime("tm")
st = os.stat("tm")
out(f"utime(NULL): both now {abs(st.st_atime - before) < 30 and abs(st.st_mtime - before) < 30}")
os.symlink("tm", "tm_link")
utimensat("tm_link", (1_100_000_000, 0), (1_100_000_000, 0), 0x100)  # AT_SYMLINK_NOFOLLOW
out(f"utimensat NOFOLLOW: link mtime {os.lstat('tm_link').st_mtime_ns}, "
    f"target untouched {abs(os.stat('tm').st_mtime - before) < 30}")
# holes: SEEK_DATA / SEEK_HOLE around a hole the file was written with
fd = os.open("sparse", os.O_RDWR | os.O_CREAT, 0o644)
os.pwrite(fd, b"x" * 4096, 0)
os.pwrite(fd, b"y" * 4096, 1 << 20)
out(f"sparse size {os.fstat(fd).st_size}, SEEK_HOLE from 0: "
    f"{os.lseek(fd, 0, os.SEEK_HOLE)}, SEEK_DATA from 4096: {os.lseek(fd, 4096, os.SEEK_DATA)}")
t("SEEK_DATA past the end", os.lseek, fd, 2 << 20, os.SEEK_DATA)
os.close(fd)
# append and truncate on open
fd = os.open("app", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
os.write(fd, b"one ")
os.pwrite(fd, b"two ", 0)  # O_APPEND: pwrite appends on Linux
os.write(fd, b"three")
os.close(fd)
out(f"O_APPEND: {read('app')!r}")
os.close(os.open("app", os.O_WRONLY | os.O_TRUNC))
out(f"O_TRUNC size: {os.stat('app').st_size}")
sv = os.statvfs(".")
out(f"statvfs namemax {sv.f_namemax}")
# a socket file
import socket
s = socket.socket(socket.AF_UNIX)
s.bind("sock")
s.close()
out(f"socket file: {stat.S_ISSOCK(os.lstat('sock').st_mode)} mode {stat.S_IMODE(os.lstat('sock').st_mode):o}")
EOF

# ---------------------------------------------------------------- modes
SEC=mode
mkdir m && cd m
touch f022 && mkdir d022
out "umask 022: file $(st %a f022) dir $(st %a d022)"
(umask 077; touch f077; mkdir d077)
out "umask 077: file $(st %a f077) dir $(st %a d077)"
(umask 0; touch f000; mkdir d000)
out "umask 000: file $(st %a f000) dir $(st %a d000)"
for m in 4755 2755 1777 7777 0 640; do
    touch "c$m" && chmod "$m" "c$m"
    out "chmod $m: $(st %a "c$m")"
done
mkdir sg && chgrp 2000 sg && chmod 2775 sg
mkdir sg/sub && touch sg/file
out "setgid dir: sub $(st '%a %g' sg/sub), file $(st '%a %g' sg/file)"
chmod 3777 sg
# 1000 creates in the setgid dir of a group it is not in: the group is
# inherited, S_ISGID on a new file is not (not in the group, no CAP_FSETID).
as1000 $PY -c 'import os; os.close(os.open("sg/by1000", os.O_CREAT | os.O_WRONLY, 0o2775)); os.mkdir("sg/dir1000", 0o2775)'
out "setgid dir, non-member: file $(st '%a %u:%g' sg/by1000), dir $(st '%a %u:%g' sg/dir1000)"
# chmod g+s by an owner outside the file's group: S_ISGID silently dropped
touch own1000 && chown 1000:2000 own1000
as1000 chmod 2755 own1000
out "chmod 2755 by non-member owner: $(st %a own1000)"
# writes and truncates by a non-root owner drop setuid (and setgid with g+x)
for m in 6755 6745 4700; do
    printf 'data' >"w$m" && chown 1000:1000 "w$m" && chmod "$m" "w$m"
    as1000 sh -c "printf more >>w$m"
    out "write by owner to $m: $(st %a "w$m")"
done
printf 'data' >tr6755 && chown 1000:1000 tr6755 && chmod 6755 tr6755
as1000 truncate -s 2 tr6755
out "truncate by owner of 6755: $(st '%a %s' tr6755)"
printf 'data' >ch6755 && chmod 6755 ch6755 && chown 1000:1000 ch6755
out "chown by root of 6755: $(st %a ch6755)"
printf 'data' >ch6745 && chmod 6745 ch6745 && chown 1000 ch6745
out "chown by root of 6745: $(st %a ch6745)"
ln -s c640 link640
chmod 600 link640
out "chmod through symlink: target $(st %a c640)"
cd ..

# ---------------------------------------------------------------- owners
SEC=owner
mkdir o && cd o
touch f && chown 1000:1000 f
out "chown 1000:1000: $(st %u:%g f)"
t "chown to root by 1000" as1000 chown 0 f
t "chgrp to own group by 1000" as1000 chgrp 1000 f
t "chgrp to other group by 1000" as1000 chgrp 2000 f
ln -s f lnk
chown -h 1000:2000 lnk
out "chown -h symlink: link $(st %u:%g lnk), target $(st %u:%g f)"
mkdir rootdir
t "mkdir by 1000 in root's 755 dir" as1000 mkdir rootdir/x
mkdir pub && chmod 1777 pub
as1000 sh -c 'mkdir pub/d1000 && touch pub/f1000'
out "created by 1000: dir $(st '%u:%g %a' pub/d1000), file $(st '%u:%g %a' pub/f1000)"
touch pub/rootfile
t "unlink other's file in sticky dir" as1000 rm -f pub/rootfile
t "unlink own file in sticky dir" as1000 rm -f pub/f1000
printf secret >pub/private && chmod 600 pub/private
t "read 600 root file as 1000" as1000 cat pub/private
t "read 600 root file as root" cat pub/private
chmod 444 pub/private
t "write 444 file as root" sh -c 'printf x >>pub/private'
t "write 444 file as 1000" as1000 sh -c 'printf x >>pub/private'
cd ..

# ---------------------------------------------------------------- times
SEC=time
mkdir tm && cd tm
touch -d '2001-02-03 04:05:06.123456789' f
out "touch -d: $(st '%x | %y' f)"
touch -m -d '2002-03-04 05:06:07.5' f
out "touch -m -d (atime omitted): $(st '%x | %y' f)"
touch -a -d '2003-04-05 06:07:08' f
out "touch -a -d (mtime omitted): $(st '%x | %y' f)"
ln -s f sl
touch -h -d '2004-05-06 07:08:09' sl
out "touch -h on symlink: link $(st %y sl), target $(st %y f)"
touch -d '2001-01-01' w && c0=$(st %Z.%z w) && m0=$(st %y w)
tick && printf data >>w
out "write advances mtime: $([ "$(st %y w)" != "$m0" ] && echo yes || echo no), ctime: $([ "$(st %Z.%z w)" != "$c0" ] && echo yes || echo no)"
c0=$(st %z w) && m0=$(st %y w) && tick && chmod 600 w
out "chmod advances ctime: $([ "$(st %z w)" != "$c0" ] && echo yes || echo no), keeps mtime: $([ "$(st %y w)" = "$m0" ] && echo yes || echo no)"
c0=$(st %z w) && tick && ln w w2
out "link advances ctime: $([ "$(st %z w)" != "$c0" ] && echo yes || echo no)"
c0=$(st %z w) && tick && setfattr -n user.t -v 1 w
out "setxattr advances ctime: $([ "$(st %z w)" != "$c0" ] && echo yes || echo no)"
mkdir dd && touch -d '2001-01-01' dd && tick && touch dd/new
out "create in dir advances dir mtime: $([ "$(st %Y dd)" -gt 978307200 ] && echo yes || echo no)"
touch -d '2001-01-01' dd && tick && rm dd/new
out "unlink in dir advances dir mtime: $([ "$(st %Y dd)" -gt 978307200 ] && echo yes || echo no)"
touch -d '2001-01-01' w && tick && truncate -s 1 w
out "truncate advances mtime: $([ "$(st %Y w)" -gt 978307200 ] && echo yes || echo no)"
touch -d '2001-01-01' w && tick && truncate -s 1 w
out "truncate to the same size advances mtime: $([ "$(st %Y w)" -gt 978307200 ] && echo yes || echo no)"
cd ..

# ---------------------------------------------------------------- links
SEC=link
mkdir l && cd l
printf 'linked\n' >a
ln a b
out "hard link: nlink $(st %h a), same inode $([ "$(st %i a)" = "$(st %i b)" ] && echo yes || echo no)"
rm a
out "after unlink: nlink $(st %h b), content $(cat b)"
ln -s b s
ln -s missing dangling
ln -s ../l/b rel
out "symlinks: $(readlink s) $(readlink dangling) $(readlink rel), lstat size $(st %s rel), type $(st %F s)"
t "stat -L dangling" stat -L dangling
t "cat through symlink" cat s
ln -P s hard_to_link
out "ln -P: $(st %F hard_to_link) -> $(readlink hard_to_link), nlink $(st %h s)"
ln -L s hard_to_target
out "ln -L: $(st %F hard_to_target), nlink of b $(st %h b)"
ln -sf b s
out "ln -sf: $(readlink s)"
mkdir sub sub/a sub/b
out "dir nlink: $(st %h sub), sub/a nlink $(st %h sub/a)"
out "dotdot is the parent: $([ "$(st %i sub/a/..)" = "$(st %i sub)" ] && echo yes || echo no)"
cd ..

# ---------------------------------------------------------------- rename (mv)
SEC=rename
mkdir r && cd r
mkdir d1 d2 full && touch d1/x full/y
t "mv -T dir onto empty dir" mv -T d1 d2
out "after mv -T: $(ls d2)"
t "mv -T dir onto non-empty dir" mv -T d2 full
t "mv -T file onto dir" sh -c 'touch f && mv -T f full'
t "mv file into dir" mv f full
out "full holds: $(ls full | tr '\n' ' ')"
printf one >p1 && printf two >p2
mv -f p1 p2
out "mv over file: $(cat p2), p1 gone $([ -e p1 ] && echo no || echo yes)"
mkdir -p deep/er && t "mv dir into its own subdir" mv deep deep/er/x
cd ..

# ---------------------------------------------------------------- sizes
SEC=size
mkdir s && cd s
$PY -c 'import sys; sys.stdout.buffer.write(bytes(range(256)) * 40)' >t
out "written: $(st %s t) $(sha256sum <t | cut -c1-16)"
truncate -s 5000 t && out "truncate -s 5000: $(st %s t) $(sha256sum <t | cut -c1-16)"
truncate -s 20000 t && out "truncate -s 20000: $(st %s t) $(sha256sum <t | cut -c1-16)"
truncate -s 0 t && out "truncate -s 0: $(st '%s %b' t)"
fallocate -l 1M fa
out "fallocate -l 1M: size $(st %s fa), allocated >= size $([ $(( $(st %b fa) * 512 )) -ge 1048576 ] && echo yes || echo no)"
fallocate -n -l 2M fa
out "fallocate -n (keep size) -l 2M: size $(st %s fa), allocated >= 2M $([ $(( $(st %b fa) * 512 )) -ge 2097152 ] && echo yes || echo no)"
$PY -c 'import sys; sys.stdout.buffer.write(b"A" * 65536 + b"B" * 65536 + b"C" * 65536)' >ph
sync ph
b0=$(st %b ph)
t "fallocate -p middle 64K" fallocate -p -o 65536 -l 65536 ph
sync ph
out "punched: size $(st %s ph) $(sha256sum <ph | cut -c1-16), blocks fewer $([ "$(st %b ph)" -lt "$b0" ] && echo yes || echo no)"
t "fallocate -z first 4K" fallocate -z -o 0 -l 4096 ph
out "zeroed: size $(st %s ph) $(sha256sum <ph | cut -c1-16)"
t "fallocate -z -n past EOF (keep size)" fallocate -z -n -o 196608 -l 4096 ph
out "zero past EOF, keep size: size $(st %s ph)"
t "fallocate -z past EOF" fallocate -z -o 196608 -l 4096 ph
out "zero past EOF: size $(st %s ph) $(sha256sum <ph | cut -c1-16)"
t "fallocate -p first 4K" fallocate -p -o 0 -l 4096 ph
out "punched at start: size $(st %s ph) $(sha256sum <ph | cut -c1-16)"
printf 'abcdefgh' >n && printf 'XY' | dd of=n bs=1 seek=3 conv=notrunc status=none
out "dd conv=notrunc: $(cat n)"
printf 'end' | dd of=n bs=1 seek=20 conv=notrunc status=none
out "write past EOF leaves a hole: size $(st %s n) $(od -An -c n | tr -s ' ' | tr -d '\n')"
cd ..

# ---------------------------------------------------------------- xattrs
SEC=xattr
mkdir x && cd x
touch f && mkdir d && ln -s f sl && mkfifo fifo
setfattr -n user.a -v hello f && setfattr -n user.b -v 0sAAEC f && setfattr -n user.empty f
out "get: $(getfattr --absolute-names -d -e hex f | grep -v '^#' | sort | tr '\n' ' ')"
t "get missing" getfattr -n user.missing f
setfattr -x user.b f
out "after remove: $(getfattr --absolute-names -d f | grep -v '^#' | sort | tr '\n' ' ')"
t "remove missing" setfattr -x user.missing f
t "set on dir" setfattr -n user.d -v 1 d
t "user.* on symlink itself" setfattr -h -n user.l -v 1 sl
t "user.* on fifo" setfattr -n user.p -v 1 fifo
t "set through symlink" setfattr -n user.via -v 1 sl
out "through symlink lands on target: $(getfattr --absolute-names --only-values -n user.via f)"
t "value of 3000 bytes" setfattr -n user.big -v "$(head -c 3000 /dev/zero | tr '\0' v)" f
t "name of 256 bytes" setfattr -n "user.$(printf '%0251d' 0)" -v 1 f
$PY - <<'EOF'
import errno, os
def t(label, fn, *a):
    try:
        fn(*a)
        r = "ok"
    except OSError as x:
        r = errno.errorcode.get(x.errno, x.errno)
    print(f"[xattr] {label}: {r}", flush=True)
t("value of 70000 bytes", os.setxattr, "f", "user.huge", b"v" * 70000)
t("XATTR_CREATE on existing", os.setxattr, "f", "user.a", b"x", os.XATTR_CREATE)
t("XATTR_REPLACE on missing", os.setxattr, "f", "user.nope", b"x", os.XATTR_REPLACE)
t("XATTR_REPLACE on existing", os.setxattr, "f", "user.a", b"replaced", os.XATTR_REPLACE)
print(f"[xattr] listxattr: {sorted(os.listxattr('f'))}")
t("unknown namespace", os.setxattr, "f", "bogus.x", b"1")
t("trusted.* as root", os.setxattr, "f", "trusted.t", b"1")
EOF
t "user.* by 1000 on root's 644 file" as1000 setfattr -n user.u -v 1 f
chown 1000 f
t "user.* by 1000 on own file" as1000 setfattr -n user.u -v 1 f
cd ..

# ---------------------------------------------------------------- ACLs
SEC=acl
mkdir a && cd a
printf 'acl' >f && chmod 600 f
t "setfacl u:1000:r" setfacl -m u:1000:r f
out "getfacl: $(getfacl -cn f | tr '\n' ' ')"
out "mode with ACL: $(st %a f)"
t "read via ACL as 1000" as1000 cat f
t "write without ACL right as 1000" as1000 sh -c 'printf x >>f'
chmod 640 f
out "chmod 640 sets the mask: $(getfacl -cn f | tr '\n' ' ')"
mkdir dd
setfacl -d -m u:1000:rwx,g::r-x,o::- dd
touch dd/inherit && mkdir dd/sub
out "default ACL inherited by file: $(getfacl -cn dd/inherit | tr '\n' ' ') mode $(st %a dd/inherit)"
out "default ACL inherited by dir: $(getfacl -cn dd/sub | tr '\n' ' ') mode $(st %a dd/sub)"
setfacl -b f
out "setfacl -b: $(getfacl -cn f | tr '\n' ' ') mode $(st %a f)"
cd ..

# ---------------------------------------------------------------- special files
SEC=special
mkdir sp && cd sp
mkfifo p && mkfifo -m 600 p600
out "fifo: $(st '%F %a' p), -m 600: $(st %a p600)"
mknod c c 1 3 && mknod b b 7 0
out "char: $(st '%F %a %t:%T' c), block: $(st '%F %t:%T' b)"
t "mknod as 1000" as1000 mknod never c 1 3
t "mknod existing" mknod p p
out "fifo round trip: $( (printf through >p &) ; cat p)"
t "write to /dev/null node" sh -c 'printf x >c'
cd ..

# ---------------------------------------------------------------- directories
SEC=dir
mkdir dl && cd dl
for n in b a c 'with space' .hidden 10 9; do touch "$n"; done
out "listing: $(ls -A | tr '\n' '|')"
out "ls -a has dot and dotdot: $(ls -a | head -n 2 | tr '\n' ' ')"
out "nlink of a dir with 0 subdirs: $(st %h .)"
cd ..

SEC=end
out "done"
