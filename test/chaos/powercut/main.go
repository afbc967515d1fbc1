// powercut: a FUSE filesystem over a backing directory that behaves like a disk with a volatile write cache, so that
// the fault suite can cut the power of the DR host's storage (this kernel has no device-mapper, hence no dm-flakey or
// dm-log-writes).
//
//	powercut --backing DIR --mount DIR
//
// What is on the backing directory is what survived: the "disk". Everything else is held in this process's memory
// until something makes it durable, as ext4 (data=ordered) on a disk with a write cache would:
//   - File data is written to the backing file only when that file is fsynced (fsync or fdatasync). Until then the
//     writes (and truncations) are pages in memory, read back from there.
//   - Names (create, mkdir, unlink, rmdir, rename) change at once in what the mount shows, and reach the backing
//     directory at the next journal commit: an fsync of any file or directory of the mount (ext4 commits its whole
//     running transaction on any fsync). A rename whose directory was never fsynced (nor anything else since) is
//     lost in a cut; the renamed file's data counts only if it was fsynced itself.
//
// This is stricter than ext4 (which also commits every few seconds and writes the data of newly allocated blocks at
// each commit): whatever survives here survives on ext4.
//
// SIGUSR1 is the power cut: every write not yet durable is dropped at once and every later operation fails with EIO,
// until SIGUSR2 brings the storage back: the mount (which processes in other mount namespaces, such as a private
// libvirtd's, share) then shows what was durable, under new node ids. SIGTERM or SIGINT is a clean shutdown:
// everything is made durable (sync), then the mount goes.
//
// Writes that grow a file are refused with ENOSPC once the new blocks held in memory would not fit in the backing
// filesystem's free space (ext4 reserves blocks at write time the same way), so that a full backing filesystem
// shows at write, not only at fsync; overwrites within a file's durable size need no room. Directories cannot be renamed (EXDEV: callers copy), hard and symbolic links are not served; sockets and
// FIFOs can be made (they are never durable); fallocate is EOPNOTSUPP and lseek SEEK_DATA/SEEK_HOLE falls back to
// the kernel's (all data), which QEMU handles.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
)

const pageSize = 64 * 1024

// A file, directory or special file of the mount. Nodes are never forgotten (the mount holds few files).
type node struct {
	id   uint64
	mode uint32
	uid  uint32
	gid  uint32

	// Where the mount shows it now: nil parent once unlinked (the root has none and is never unlinked).
	parent *node
	name   string
	kids   map[string]*node // directories

	// Where its committed entry lives on the backing directory, relative; "" when it has none yet.
	durable string

	// Regular files.
	backing *os.File         // the committed file, opened once it has an entry (follows its renames)
	size    int64            // what the mount shows
	shown   int64            // backing bytes at and beyond this read as zeros (a truncation not yet durable)
	pages   map[int64][]byte // unflushed data, by page index
	grown   int64            // bytes of those pages beyond the backing file's size: new blocks it will need
	opens   int
	mtime   time.Time
}

func (n *node) isDir() bool  { return n.mode&syscall.S_IFMT == syscall.S_IFDIR }
func (n *node) isFile() bool { return n.mode&syscall.S_IFMT == syscall.S_IFREG }

type powercut struct {
	fuse.RawFileSystem
	mu       sync.Mutex
	backing  string
	nodes    map[uint64]*node
	next     uint64
	handles  map[uint64][]string // directory handles: the names listed at opendir
	nextFh   uint64
	nsDirty  bool // names changed since the last journal commit
	cut      bool
	reserved int64 // new blocks the unflushed data will need on the backing filesystem, in bytes
}

func newPowercut(backing string) (*powercut, error) {
	fs := &powercut{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		backing:       backing,
		nodes:         map[uint64]*node{},
		next:          fuse.FUSE_ROOT_ID + 1,
		handles:       map[uint64][]string{},
		nextFh:        1,
	}
	if err := os.MkdirAll(filepath.Join(backing, stagingDir), 0o700); err != nil {
		return nil, err
	}
	// What a previous commit was cut off from finishing: staged files that no name holds are gone.
	stale, _ := os.ReadDir(filepath.Join(backing, stagingDir))
	for _, e := range stale {
		_ = os.Remove(filepath.Join(backing, stagingDir, e.Name()))
	}
	if err := fs.load(); err != nil {
		return nil, err
	}
	return fs, nil
}

// load makes what the mount shows what the backing directory holds: at mount, and when the storage comes back after
// a cut. The root keeps its node id; every other node gets a new one (never one the kernel saw before the cut).
func (fs *powercut) load() error {
	st, err := os.Stat(fs.backing)
	if err != nil {
		return err
	}
	fs.nodes = map[uint64]*node{}
	fs.handles = map[uint64][]string{}
	fs.reserved = 0
	fs.nsDirty = false
	root := &node{id: fuse.FUSE_ROOT_ID, mode: uint32(st.Mode().Perm()) | syscall.S_IFDIR, kids: map[string]*node{}}
	root.durable, root.mtime = ".", st.ModTime()
	fs.nodes[root.id] = root
	return fs.loadDir(root)
}

// The storage back after a cut (SIGUSR2): the mount stays (processes in other mount namespaces see it too), and
// shows what was durable.
func (fs *powercut) restore() error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if !fs.cut {
		return nil
	}
	if err := fs.load(); err != nil {
		return err
	}
	fs.cut = false
	return nil
}

// Files a commit moves aside while it renames, inside the backing directory (never shown by the mount).
const stagingDir = ".powercut-staging"

func (fs *powercut) newNode(mode uint32, parent *node, name string) *node {
	n := &node{id: fs.next, mode: mode, parent: parent, name: name, mtime: time.Now()}
	fs.next++
	if n.isDir() {
		n.kids = map[string]*node{}
	}
	if n.isFile() {
		n.pages = map[int64][]byte{}
	}
	fs.nodes[n.id] = n
	if parent != nil {
		parent.kids[name] = n
	}
	return n
}

// loadDir builds the tree under dir from the backing directory.
func (fs *powercut) loadDir(dir *node) error {
	entries, err := os.ReadDir(filepath.Join(fs.backing, dir.durable))
	if err != nil {
		return err
	}
	for _, e := range entries {
		if dir.parent == nil && e.Name() == stagingDir {
			continue
		}
		info, err := e.Info()
		if err != nil {
			return err
		}
		rel := filepath.Join(dir.durable, e.Name())
		switch {
		case info.IsDir():
			kid := fs.newNode(uint32(info.Mode().Perm())|syscall.S_IFDIR, dir, e.Name())
			kid.durable = rel
			if err := fs.loadDir(kid); err != nil {
				return err
			}
		case info.Mode().IsRegular():
			kid := fs.newNode(uint32(info.Mode().Perm())|syscall.S_IFREG, dir, e.Name())
			kid.durable = rel
			if kid.backing, err = os.OpenFile(filepath.Join(fs.backing, rel), os.O_RDWR, 0); err != nil {
				return err
			}
			kid.size, kid.shown, kid.mtime = info.Size(), info.Size(), info.ModTime()
		default:
			// Sockets and FIFOs never come back from a cut: a leftover one is dropped.
			_ = os.Remove(filepath.Join(fs.backing, rel))
		}
	}
	return nil
}

func (fs *powercut) String() string { return "powercut" }

// Journal commit --------------------------------------------------------------------------------------------------

// commitNames makes the names the mount shows durable on the backing directory, as one journal commit.
func (fs *powercut) commitNames() error {
	if !fs.nsDirty {
		return nil
	}
	targets := map[*node]string{}
	var walk func(n *node, rel string)
	walk = func(n *node, rel string) {
		targets[n] = rel
		for name, kid := range n.kids {
			walk(kid, filepath.Join(rel, name))
		}
	}
	walk(fs.nodes[fuse.FUSE_ROOT_ID], ".")
	ids := make([]uint64, 0, len(fs.nodes))
	for id := range fs.nodes {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	staged := func(n *node) string { return filepath.Join(stagingDir, strconv.FormatUint(n.id, 10)) }
	// 1. Committed files whose name changed (or went) move aside, so that no rename lands on another's name.
	for _, id := range ids {
		n := fs.nodes[id]
		if !n.isFile() || n.durable == "" || n.durable == targets[n] {
			continue
		}
		if err := os.Rename(filepath.Join(fs.backing, n.durable), filepath.Join(fs.backing, staged(n))); err != nil {
			return err
		}
		n.durable = staged(n)
	}
	// 2. Directories that went, children first.
	for i := len(ids) - 1; i >= 0; i-- {
		n := fs.nodes[ids[i]]
		if _, linked := targets[n]; !n.isDir() || linked || n.durable == "" {
			continue
		}
		if err := os.Remove(filepath.Join(fs.backing, n.durable)); err != nil {
			return err
		}
		n.durable = ""
	}
	// 3. New directories, parents first (lower ids were made first).
	for _, id := range ids {
		n := fs.nodes[id]
		target, linked := targets[n]
		if !n.isDir() || n.durable != "" || !linked {
			continue
		}
		if err := os.Mkdir(filepath.Join(fs.backing, target), os.FileMode(n.mode&0o7777)); err != nil {
			return err
		}
		n.durable = target
	}
	// 4. Files at their names: new ones empty (their data is durable only once fsynced), moved ones from aside.
	for _, id := range ids {
		n := fs.nodes[id]
		target, linked := targets[n]
		if !n.isFile() {
			continue
		}
		switch {
		case !linked && n.durable != "":
			if err := os.Remove(filepath.Join(fs.backing, n.durable)); err != nil {
				return err
			}
			n.durable = ""
		case linked && n.durable == "":
			f, err := os.OpenFile(filepath.Join(fs.backing, target), os.O_RDWR|os.O_CREATE|os.O_EXCL, os.FileMode(n.mode&0o7777))
			if err != nil {
				return err
			}
			n.backing, n.durable, n.shown = f, target, 0
		case linked && n.durable != target:
			if err := os.Rename(filepath.Join(fs.backing, n.durable), filepath.Join(fs.backing, target)); err != nil {
				return err
			}
			n.durable = target
		}
	}
	fs.nsDirty = false
	return nil
}

// syncFile makes the file's data durable (after the names: its entry must exist to hold it).
func (fs *powercut) syncFile(n *node) error {
	if err := fs.commitNames(); err != nil {
		return err
	}
	if n.backing == nil || n.durable == "" {
		return nil // unlinked: its data is never durable
	}
	if n.shown < n.size || len(n.pages) > 0 {
		if err := n.backing.Truncate(min(n.shown, n.size)); err != nil {
			return err
		}
	}
	idx := make([]int64, 0, len(n.pages))
	for i := range n.pages {
		idx = append(idx, i)
	}
	sort.Slice(idx, func(a, b int) bool { return idx[a] < idx[b] })
	for _, i := range idx {
		page := n.pages[i]
		off := i * pageSize
		length := min(int64(len(page)), n.size-off)
		if length <= 0 {
			continue
		}
		if _, err := n.backing.WriteAt(page[:length], off); err != nil {
			return err // the pages stay: a later fsync tries again
		}
	}
	if err := n.backing.Truncate(n.size); err != nil {
		return err
	}
	fs.drop(n)
	n.shown = n.size
	return nil
}

func (fs *powercut) syncAll() error {
	if err := fs.commitNames(); err != nil {
		return err
	}
	for _, n := range fs.nodes {
		if n.isFile() {
			if err := fs.syncFile(n); err != nil {
				return err
			}
		}
	}
	return nil
}

// The power cut: nothing unflushed survives, nothing works until the next mount.
func (fs *powercut) powerCut() {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.cut = true
	for _, n := range fs.nodes {
		n.pages = nil
		if n.backing != nil {
			_ = n.backing.Close()
			n.backing = nil
		}
	}
	fs.reserved = 0
}

// Data -------------------------------------------------------------------------------------------------------------

// page returns the page's bytes as the mount shows them now (a copy for a new page).
func (fs *powercut) page(n *node, i int64) ([]byte, error) {
	if p, ok := n.pages[i]; ok {
		return p, nil
	}
	p := make([]byte, pageSize)
	off := i * pageSize
	if n.backing != nil && off < n.shown {
		length := min(int64(pageSize), n.shown-off)
		if _, err := n.backing.ReadAt(p[:length], off); err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
	}
	return p, nil
}

func (fs *powercut) read(n *node, off int64, size int) ([]byte, error) {
	if off >= n.size {
		return nil, nil
	}
	end := min(off+int64(size), n.size)
	out := make([]byte, end-off)
	for at := off; at < end; {
		i := at / pageSize
		within := at - i*pageSize
		chunk := min(int64(pageSize)-within, end-at)
		if p, ok := n.pages[i]; ok {
			copy(out[at-off:at-off+chunk], p[within:within+chunk])
		} else if n.backing != nil && at < n.shown {
			length := min(chunk, n.shown-at)
			if _, err := n.backing.ReadAt(out[at-off:at-off+length], at); err != nil && !errors.Is(err, io.EOF) {
				return nil, err
			}
		}
		at += chunk
	}
	return out, nil
}

// drop forgets the file's unflushed pages and what they reserved.
func (fs *powercut) drop(n *node) {
	fs.reserved -= n.grown
	n.grown = 0
	n.pages = map[int64][]byte{}
}

func (fs *powercut) write(n *node, off int64, data []byte) error {
	// Pages past the backing file's end need new blocks: refused when the backing filesystem has no room for them.
	fresh := int64(0)
	for i := off / pageSize; i*pageSize < off+int64(len(data)); i++ {
		if _, ok := n.pages[i]; !ok && (i+1)*pageSize > n.shown {
			fresh += pageSize
		}
	}
	if fresh > 0 {
		var st syscall.Statfs_t
		if err := syscall.Statfs(fs.backing, &st); err != nil {
			return err
		}
		if fs.reserved+fresh > int64(st.Bavail)*st.Bsize {
			return syscall.ENOSPC
		}
	}
	for at := off; at < off+int64(len(data)); {
		i := at / pageSize
		p, err := fs.page(n, i)
		if err != nil {
			return err
		}
		if _, ok := n.pages[i]; !ok {
			n.pages[i] = p
			if (i+1)*pageSize > n.shown {
				n.grown += pageSize
				fs.reserved += pageSize
			}
		}
		within := at - i*pageSize
		copied := copy(p[within:], data[at-off:])
		at += int64(copied)
	}
	n.size = max(n.size, off+int64(len(data)))
	n.mtime = time.Now()
	return nil
}

func (fs *powercut) truncate(n *node, size int64) {
	if size < n.size {
		for i, p := range n.pages {
			start := i * pageSize
			if start >= size {
				delete(n.pages, i)
			} else if size < start+pageSize {
				clear(p[size-start:])
			}
		}
		n.shown = min(n.shown, size)
	}
	n.size = size
	n.mtime = time.Now()
}

// FUSE operations --------------------------------------------------------------------------------------------------

// Nothing is cached by the kernel: after a cut and restore, no name may lead to a node of before.
const ttl = 0

func (fs *powercut) attr(n *node, out *fuse.Attr) {
	out.Ino = n.id
	out.Mode = n.mode
	out.Size = uint64(n.size)
	out.Blocks = (uint64(n.size) + 511) / 512
	out.Nlink = 1
	if n.isDir() {
		out.Nlink = 2
		out.Size = 4096
	}
	out.Uid, out.Gid = n.uid, n.gid
	t := uint64(n.mtime.Unix())
	ns := uint32(n.mtime.Nanosecond())
	out.Atime, out.Mtime, out.Ctime = t, t, t
	out.Atimensec, out.Mtimensec, out.Ctimensec = ns, ns, ns
	out.Blksize = 4096
}

func (fs *powercut) entry(n *node, out *fuse.EntryOut) {
	out.NodeId = n.id
	out.Generation = 1
	out.SetEntryTimeout(ttl)
	out.SetAttrTimeout(ttl)
	fs.attr(n, &out.Attr)
}

// op runs one operation under the lock; after a cut every one fails.
func (fs *powercut) op(f func() fuse.Status) fuse.Status {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if fs.cut {
		return fuse.EIO
	}
	return f()
}

// opOn is op on the node the kernel names: ENOENT when it is gone.
func (fs *powercut) opOn(id uint64, f func(n *node) fuse.Status) fuse.Status {
	return fs.op(func() fuse.Status {
		n := fs.nodes[id]
		if n == nil {
			return fuse.ENOENT
		}
		return f(n)
	})
}

func errno(err error) fuse.Status {
	var e syscall.Errno
	switch {
	case err == nil:
		return fuse.OK
	case errors.As(err, &e):
		return fuse.Status(e)
	default:
		return fuse.EIO
	}
}

func (fs *powercut) dir(id uint64) (*node, fuse.Status) {
	n := fs.nodes[id]
	if n == nil {
		return nil, fuse.ENOENT
	}
	if !n.isDir() {
		return nil, fuse.ENOTDIR
	}
	return n, fuse.OK
}

func (fs *powercut) Lookup(_ <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	return fs.op(func() fuse.Status {
		dir, st := fs.dir(h.NodeId)
		if !st.Ok() {
			return st
		}
		kid := dir.kids[name]
		if kid == nil {
			return fuse.ENOENT
		}
		fs.entry(kid, out)
		return fuse.OK
	})
}

func (fs *powercut) Forget(uint64, uint64) {}

func (fs *powercut) GetAttr(_ <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	return fs.opOn(in.NodeId, func(n *node) fuse.Status {
		out.SetTimeout(ttl)
		fs.attr(n, &out.Attr)
		return fuse.OK
	})
}

func (fs *powercut) SetAttr(_ <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	return fs.opOn(in.NodeId, func(n *node) fuse.Status {
		if in.Valid&fuse.FATTR_SIZE != 0 {
			if !n.isFile() {
				return fuse.EINVAL
			}
			fs.truncate(n, int64(in.Size))
		}
		if in.Valid&fuse.FATTR_MODE != 0 {
			n.mode = n.mode&syscall.S_IFMT | in.Mode&0o7777
		}
		if in.Valid&fuse.FATTR_UID != 0 {
			n.uid = in.Uid
		}
		if in.Valid&fuse.FATTR_GID != 0 {
			n.gid = in.Gid
		}
		if in.Valid&fuse.FATTR_MTIME != 0 {
			n.mtime = time.Unix(int64(in.Mtime), int64(in.Mtimensec))
		}
		out.SetTimeout(ttl)
		fs.attr(n, &out.Attr)
		return fuse.OK
	})
}

// add makes a new name in a directory: shown at once, durable at the next journal commit.
func (fs *powercut) add(parent uint64, name string, mode uint32, caller fuse.Caller) (*node, fuse.Status) {
	dir, st := fs.dir(parent)
	if !st.Ok() {
		return nil, st
	}
	if dir.kids[name] != nil {
		return nil, fuse.Status(syscall.EEXIST)
	}
	n := fs.newNode(mode, dir, name)
	n.uid, n.gid = caller.Uid, caller.Gid
	fs.nsDirty = true
	return n, fuse.OK
}

func (fs *powercut) Mknod(_ <-chan struct{}, in *fuse.MknodIn, name string, out *fuse.EntryOut) fuse.Status {
	return fs.op(func() fuse.Status {
		switch in.Mode & syscall.S_IFMT {
		case syscall.S_IFREG, syscall.S_IFSOCK, syscall.S_IFIFO:
		default:
			return fuse.EPERM
		}
		n, st := fs.add(in.NodeId, name, in.Mode, in.Caller)
		if st.Ok() {
			fs.entry(n, out)
		}
		return st
	})
}

func (fs *powercut) Mkdir(_ <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	return fs.op(func() fuse.Status {
		n, st := fs.add(in.NodeId, name, in.Mode&0o7777|syscall.S_IFDIR, in.Caller)
		if st.Ok() {
			fs.entry(n, out)
		}
		return st
	})
}

// unlink takes the name away; a file keeps its data for those who hold it open.
func (fs *powercut) unlink(n *node) {
	delete(n.parent.kids, n.name)
	n.parent = nil
	fs.nsDirty = true
	if n.isFile() && n.opens == 0 {
		fs.drop(n)
	}
}

func (fs *powercut) Unlink(_ <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return fs.op(func() fuse.Status {
		dir, st := fs.dir(h.NodeId)
		if !st.Ok() {
			return st
		}
		n := dir.kids[name]
		if n == nil {
			return fuse.ENOENT
		}
		if n.isDir() {
			return fuse.Status(syscall.EISDIR)
		}
		fs.unlink(n)
		return fuse.OK
	})
}

func (fs *powercut) Rmdir(_ <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return fs.op(func() fuse.Status {
		dir, st := fs.dir(h.NodeId)
		if !st.Ok() {
			return st
		}
		n := dir.kids[name]
		if n == nil {
			return fuse.ENOENT
		}
		if !n.isDir() {
			return fuse.ENOTDIR
		}
		if len(n.kids) > 0 {
			return fuse.Status(syscall.ENOTEMPTY)
		}
		fs.unlink(n)
		return fuse.OK
	})
}

const renameNoReplace = 1 // RENAME_NOREPLACE

func (fs *powercut) Rename(_ <-chan struct{}, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	return fs.op(func() fuse.Status {
		from, st := fs.dir(in.NodeId)
		if !st.Ok() {
			return st
		}
		to, st := fs.dir(in.Newdir)
		if !st.Ok() {
			return st
		}
		n := from.kids[oldName]
		if n == nil {
			return fuse.ENOENT
		}
		if in.Flags&^renameNoReplace != 0 {
			return fuse.EINVAL // RENAME_EXCHANGE, RENAME_WHITEOUT
		}
		if n.isDir() {
			return fuse.Status(syscall.EXDEV)
		}
		if old := to.kids[newName]; old != nil {
			if old == n {
				return fuse.OK
			}
			if in.Flags&renameNoReplace != 0 {
				return fuse.Status(syscall.EEXIST)
			}
			if old.isDir() {
				return fuse.Status(syscall.EISDIR)
			}
			fs.unlink(old)
		}
		delete(from.kids, oldName)
		n.parent, n.name = to, newName
		to.kids[newName] = n
		fs.nsDirty = true
		return fuse.OK
	})
}

func (fs *powercut) Access(<-chan struct{}, *fuse.AccessIn) fuse.Status { return fuse.OK }

func (fs *powercut) Create(_ <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	return fs.op(func() fuse.Status {
		dir, st := fs.dir(in.NodeId)
		if !st.Ok() {
			return st
		}
		n := dir.kids[name]
		if n != nil {
			if in.Flags&syscall.O_EXCL != 0 {
				return fuse.Status(syscall.EEXIST)
			}
			if !n.isFile() {
				return fuse.EINVAL
			}
			if in.Flags&syscall.O_TRUNC != 0 {
				fs.truncate(n, 0)
			}
		} else if n, st = fs.add(in.NodeId, name, in.Mode&0o7777|syscall.S_IFREG, in.Caller); !st.Ok() {
			return st
		}
		n.opens++
		fs.entry(n, &out.EntryOut)
		return fuse.OK
	})
}

func (fs *powercut) Open(_ <-chan struct{}, in *fuse.OpenIn, _ *fuse.OpenOut) fuse.Status {
	return fs.opOn(in.NodeId, func(n *node) fuse.Status {
		if !n.isFile() {
			return fuse.EINVAL
		}
		if in.Flags&syscall.O_TRUNC != 0 {
			fs.truncate(n, 0)
		}
		n.opens++
		return fuse.OK
	})
}

func (fs *powercut) Release(_ <-chan struct{}, in *fuse.ReleaseIn) {
	_ = fs.op(func() fuse.Status {
		if n := fs.nodes[in.NodeId]; n != nil && n.opens > 0 {
			n.opens--
			if n.opens == 0 && n.parent == nil && n.isFile() {
				fs.drop(n)
			}
		}
		return fuse.OK
	})
}

func (fs *powercut) Read(_ <-chan struct{}, in *fuse.ReadIn, _ []byte) (fuse.ReadResult, fuse.Status) {
	var data []byte
	st := fs.opOn(in.NodeId, func(n *node) fuse.Status {
		var err error
		data, err = fs.read(n, int64(in.Offset), int(in.Size))
		return errno(err)
	})
	return fuse.ReadResultData(data), st
}

func (fs *powercut) Write(_ <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	st := fs.opOn(in.NodeId, func(n *node) fuse.Status {
		return errno(fs.write(n, int64(in.Offset), data))
	})
	if !st.Ok() {
		return 0, st
	}
	return uint32(len(data)), st
}

func (fs *powercut) Flush(<-chan struct{}, *fuse.FlushIn) fuse.Status { return fuse.OK }

func (fs *powercut) Fsync(_ <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	return fs.opOn(in.NodeId, func(n *node) fuse.Status {
		if !n.isFile() {
			return errno(fs.commitNames())
		}
		return errno(fs.syncFile(n))
	})
}

func (fs *powercut) FsyncDir(_ <-chan struct{}, _ *fuse.FsyncIn) fuse.Status {
	return fs.op(func() fuse.Status { return errno(fs.commitNames()) })
}

func (fs *powercut) Fallocate(<-chan struct{}, *fuse.FallocateIn) fuse.Status {
	return fuse.Status(syscall.EOPNOTSUPP)
}

func (fs *powercut) OpenDir(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	return fs.op(func() fuse.Status {
		dir, st := fs.dir(in.NodeId)
		if !st.Ok() {
			return st
		}
		names := make([]string, 0, len(dir.kids))
		for name := range dir.kids {
			names = append(names, name)
		}
		sort.Strings(names)
		out.Fh = fs.nextFh
		fs.nextFh++
		fs.handles[out.Fh] = names
		return fuse.OK
	})
}

func (fs *powercut) readDir(in *fuse.ReadIn, out *fuse.DirEntryList, plus bool) fuse.Status {
	return fs.op(func() fuse.Status {
		dir, st := fs.dir(in.NodeId)
		if !st.Ok() {
			return st
		}
		names := fs.handles[in.Fh]
		for i := int(in.Offset); i < len(names); i++ {
			kid := dir.kids[names[i]]
			if kid == nil {
				continue // gone since opendir
			}
			e := fuse.DirEntry{Mode: kid.mode, Name: names[i], Ino: kid.id, Off: uint64(i + 1)}
			if plus {
				entry := out.AddDirLookupEntry(e)
				if entry == nil {
					break
				}
				fs.entry(kid, entry)
			} else if !out.AddDirEntry(e) {
				break
			}
		}
		return fuse.OK
	})
}

func (fs *powercut) ReadDir(_ <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return fs.readDir(in, out, false)
}

func (fs *powercut) ReadDirPlus(_ <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return fs.readDir(in, out, true)
}

func (fs *powercut) ReleaseDir(in *fuse.ReleaseIn) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	delete(fs.handles, in.Fh)
}

func (fs *powercut) StatFs(_ <-chan struct{}, _ *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	return fs.op(func() fuse.Status {
		var st syscall.Statfs_t
		if err := syscall.Statfs(fs.backing, &st); err != nil {
			return errno(err)
		}
		held := uint64(fs.reserved) / uint64(st.Bsize)
		out.Blocks, out.Bfree, out.Bavail = st.Blocks, st.Bfree-min(st.Bfree, held), st.Bavail-min(st.Bavail, held)
		out.Files, out.Ffree = st.Files, st.Ffree
		out.Bsize, out.Frsize, out.NameLen = uint32(st.Bsize), uint32(st.Frsize), 255
		return fuse.OK
	})
}

func main() {
	backing := flag.String("backing", "", "the directory that holds what is durable (the disk)")
	mount := flag.String("mount", "", "where to mount the layer")
	flag.Parse()
	if *backing == "" || *mount == "" {
		fmt.Fprintln(os.Stderr, "usage: powercut --backing DIR --mount DIR")
		os.Exit(2)
	}
	fs, err := newPowercut(*backing)
	if err != nil {
		fmt.Fprintf(os.Stderr, "powercut: %v\n", err)
		os.Exit(1)
	}
	server, err := fuse.NewServer(fs, *mount, &fuse.MountOptions{
		AllowOther:        true,
		DirectMountStrict: true,
		FsName:            *backing,
		Name:              "powercut",
		MaxWrite:          1 << 20,
		DisableXAttrs:     true,
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "powercut: mount %s: %v\n", *mount, err)
		os.Exit(1)
	}
	go server.Serve()
	if err := server.WaitMount(); err != nil {
		fmt.Fprintf(os.Stderr, "powercut: mount %s: %v\n", *mount, err)
		os.Exit(1)
	}
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		for s := range signals {
			switch s {
			case syscall.SIGUSR1:
				fs.powerCut()
				fmt.Println("cut")
				continue
			case syscall.SIGUSR2:
				if err := fs.restore(); err != nil {
					fmt.Fprintf(os.Stderr, "powercut: restore: %v\n", err)
					os.Exit(1)
				}
				fmt.Println("restored")
				continue
			}
			fs.mu.Lock()
			if !fs.cut {
				if err := fs.syncAll(); err != nil {
					fmt.Fprintf(os.Stderr, "powercut: sync at shutdown: %v\n", err)
				}
			}
			fs.mu.Unlock()
			_ = server.Unmount()
		}
	}()
	fmt.Println("ready")
	server.Wait()
}
