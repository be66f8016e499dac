//! Dev mode's file watcher (`run --watch`): reports changes of the app's `.py` and `.ini` files
//! under `[app].directory`, debounced into one batch per burst of writes, so the main loop can
//! run a reload through the same path as `sauna-supervisor reload`. It owns the inotify
//! descriptor and the map of watched directories; it does not decide what a change means.
//!
//! inotify (through `nix`) rather than polling: a change is seen at once, an idle tree costs
//! nothing, and it needs no new crate. inotify is not recursive, so every directory gets its own
//! watch, and a directory created (or moved in) later is watched as soon as its creation is
//! seen; files that appeared in it before its watch existed are reported by scanning it then.
//! Skipped: hidden directories (`.git`, `.venv`, editors' state), `__pycache__`, `venv`,
//! `site-packages`, `node_modules`, and any directory holding a `pyvenv.cfg` (a virtualenv of
//! any name): code there changes through `pip`, not through editing, and watching it would cost
//! thousands of watches. A burst is over after [`DEBOUNCE`] without another change: an editor's
//! save (write a temp file, rename it over the old one) or a `git checkout` of many files is one
//! reload, not one per file.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Quiet time after the last change before a batch is reported.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// File extensions whose changes are reported.
const WATCHED_EXTENSIONS: &[&str] = &["py", "ini"];

/// Directory names never watched (besides hidden ones and virtualenvs).
const SKIPPED_DIRS: &[&str] = &["__pycache__", "venv", "site-packages", "node_modules"];

/// What is watched in each directory: a finished write, a file renamed in or out, created or
/// deleted (`IN_CREATE` also announces new directories), and metadata (`touch`).
fn watch_mask() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_ONLYDIR
}

/// Why the watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// `inotify_init1` failed (e.g. the per-user instance limit).
    #[error("cannot start inotify: {0}")]
    Init(#[source] nix::Error),
    /// The app directory cannot be watched (missing, not a directory, no permission, or the
    /// `fs.inotify.max_user_watches` limit).
    #[error("cannot watch {}: {source}", path.display())]
    Directory {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: nix::Error,
    },
    /// The descriptor could not join the tokio reactor (not called on a runtime).
    #[error("cannot register the inotify descriptor with the runtime: {0}")]
    Register(#[source] io::Error),
}

/// Starts watching `directory` recursively; each message is one debounced batch of changed
/// `.py`/`.ini` paths (sorted, without duplicates). The watcher ends when the receiver is
/// dropped. Must be called on a tokio runtime.
pub fn spawn(directory: PathBuf) -> Result<mpsc::Receiver<Vec<PathBuf>>, WatchError> {
    let inotify =
        Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(WatchError::Init)?;
    // SAFETY: `InotifyFd` owns the descriptor (an `OwnedFd` inside `Inotify`) and moves into
    // the `AsyncFd`, so it stays open and is the same descriptor until the `AsyncFd` drops it.
    let registered =
        unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) };
    let mut watcher = Watcher {
        inotify: registered.map_err(|error| WatchError::Register(error.into_parts().1))?,
        directories: HashMap::new(),
    };
    let wd = watcher
        .inotify
        .get_ref()
        .0
        .add_watch(&directory, watch_mask())
        .map_err(|source| WatchError::Directory {
            path: directory.clone(),
            source,
        })?;
    watcher.directories.insert(wd, directory.clone());
    let mut ignored = BTreeSet::new();
    watcher.watch_children(&directory, &mut ignored);
    let (sender, receiver) = mpsc::channel(4);
    tokio::spawn(watcher.run(sender));
    Ok(receiver)
}

/// The inotify instance as the tokio reactor wants it.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

struct Watcher {
    inotify: AsyncFd<InotifyFd>,
    /// The directory each watch is on.
    directories: HashMap<WatchDescriptor, PathBuf>,
}

impl Watcher {
    async fn run(mut self, sender: mpsc::Sender<Vec<PathBuf>>) {
        let mut pending: BTreeSet<PathBuf> = BTreeSet::new();
        let mut quiet_at: Option<Instant> = None;
        loop {
            let deadline = quiet_at;
            let timer = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ready = self.inotify.readable() => {
                    let mut guard = match ready {
                        Ok(guard) => guard,
                        Err(error) => {
                            tracing::error!("--watch: inotify failed: {error}; no more reloads on file changes");
                            return;
                        }
                    };
                    let events = match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                        Ok(Ok(events)) => events,
                        Ok(Err(error)) => {
                            tracing::error!("--watch: cannot read inotify events: {error}; no more reloads on file changes");
                            return;
                        }
                        // Spurious wakeup: readiness is cleared, wait again.
                        Err(_would_block) => continue,
                    };
                    let before = pending.len();
                    for event in events {
                        self.on_event(event, &mut pending);
                    }
                    if pending.len() > before || (!pending.is_empty() && quiet_at.is_some()) {
                        // Any event restarts the quiet period while a batch is open.
                        quiet_at = Some(Instant::now() + DEBOUNCE);
                    }
                }
                () = timer => {
                    quiet_at = None;
                    let batch: Vec<PathBuf> = std::mem::take(&mut pending).into_iter().collect();
                    if sender.send(batch).await.is_err() {
                        return;
                    }
                }
                () = sender.closed() => return,
            }
        }
    }

    fn on_event(&mut self, event: InotifyEvent, pending: &mut BTreeSet<PathBuf>) {
        if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            // Events were lost: something changed, we cannot say what.
            if let Some(root) = self
                .directories
                .values()
                .min_by_key(|dir| dir.as_os_str().len())
            {
                pending.insert(root.clone());
            }
            return;
        }
        if event.mask.contains(AddWatchFlags::IN_IGNORED) {
            // The directory was deleted or moved away; its watch is gone.
            self.directories.remove(&event.wd);
            return;
        }
        let (Some(dir), Some(name)) = (self.directories.get(&event.wd), event.name) else {
            return;
        };
        let path = dir.join(&name);
        if event.mask.contains(AddWatchFlags::IN_ISDIR) {
            let arrived = event
                .mask
                .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO);
            if arrived && !skipped_dir(&path) {
                self.watch_tree(&path, pending);
            }
            return;
        }
        if watched_file(&path) {
            pending.insert(path);
        }
    }

    /// Watches a directory that appeared after the start, and its subdirectories; files
    /// already in it count as changed (they were written before the watch existed).
    fn watch_tree(&mut self, dir: &Path, pending: &mut BTreeSet<PathBuf>) {
        match self.inotify.get_ref().0.add_watch(dir, watch_mask()) {
            Ok(wd) => {
                self.directories.insert(wd, dir.to_path_buf());
            }
            Err(error) => {
                tracing::warn!("--watch: cannot watch {}: {error}", dir.display());
                return;
            }
        }
        self.watch_children(dir, pending);
    }

    /// Watches every subdirectory of `dir` (already watched itself) and collects its watched
    /// files into `found`.
    fn watch_children(&mut self, dir: &Path, found: &mut BTreeSet<PathBuf>) {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!("--watch: cannot list {}: {error}", dir.display());
                return;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            // Not following symlinks: a link to `/` must not make us watch the whole disk.
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                if !skipped_dir(&path) {
                    self.watch_tree(&path, found);
                }
            } else if watched_file(&path) {
                found.insert(path);
            }
        }
    }
}

fn watched_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(OsStr::to_str)
        .is_some_and(|name| name.starts_with('.'));
    !hidden
        && path
            .extension()
            .and_then(OsStr::to_str)
            .is_some_and(|extension| WATCHED_EXTENSIONS.contains(&extension))
}

fn skipped_dir(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(OsStr::to_str) else {
        return true;
    };
    name.starts_with('.') || SKIPPED_DIRS.contains(&name) || path.join("pyvenv.cfg").exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::runtime;

    /// Long enough that a second batch would have been reported.
    const QUIET: Duration = Duration::from_millis(900);

    async fn next(changes: &mut mpsc::Receiver<Vec<PathBuf>>) -> Vec<PathBuf> {
        tokio::time::timeout(Duration::from_secs(5), changes.recv())
            .await
            .expect("a batch within 5 s")
            .expect("the watcher runs")
    }

    async fn nothing(changes: &mut mpsc::Receiver<Vec<PathBuf>>) {
        if let Ok(batch) = tokio::time::timeout(QUIET, changes.recv()).await {
            panic!("unexpected batch: {batch:?}");
        }
    }

    #[test]
    fn a_touched_py_file_is_reported_once_after_the_quiet_time() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("app.py");
            std::fs::write(&file, "x = 1\n").unwrap();
            let mut changes = spawn(dir.path().to_path_buf()).unwrap();
            let touched = std::time::Instant::now();
            std::fs::write(&file, "x = 2\n").unwrap();
            assert_eq!(next(&mut changes).await, [file]);
            assert!(touched.elapsed() >= DEBOUNCE, "{:?}", touched.elapsed());
            nothing(&mut changes).await;
        });
    }

    #[test]
    fn quick_writes_to_several_files_are_one_batch() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("pkg")).unwrap();
            let mut changes = spawn(dir.path().to_path_buf()).unwrap();
            let a = dir.path().join("pkg/a.py");
            let ini = dir.path().join("production.ini");
            for round in 0..5 {
                std::fs::write(&a, format!("x = {round}\n")).unwrap();
                std::fs::write(&ini, format!("[app:main]\nx = {round}\n")).unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(next(&mut changes).await, [a, ini], "sorted");
            nothing(&mut changes).await;
        });
    }

    #[test]
    fn other_files_and_skipped_directories_are_ignored() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            for skipped in ["__pycache__", ".git", ".venv", "venv", "env/lib"] {
                std::fs::create_dir_all(dir.path().join(skipped)).unwrap();
            }
            // A virtualenv with an unusual name.
            std::fs::write(dir.path().join("env/pyvenv.cfg"), "home = /usr/bin\n").unwrap();
            let mut changes = spawn(dir.path().to_path_buf()).unwrap();
            std::fs::write(dir.path().join("notes.txt"), "hi").unwrap();
            std::fs::write(dir.path().join("__pycache__/app.cpython-311.py"), "").unwrap();
            std::fs::write(dir.path().join(".git/hooks.py"), "").unwrap();
            std::fs::write(dir.path().join(".venv/site.py"), "").unwrap();
            std::fs::write(dir.path().join("venv/site.py"), "").unwrap();
            std::fs::write(dir.path().join("env/lib/site.py"), "").unwrap();
            std::fs::write(dir.path().join(".app.py.swp"), "").unwrap();
            nothing(&mut changes).await;
        });
    }

    #[test]
    fn a_new_directory_is_watched_and_a_rename_into_place_counts() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut changes = spawn(dir.path().to_path_buf()).unwrap();
            let package = dir.path().join("newpkg");
            std::fs::create_dir(&package).unwrap();
            let first = package.join("__init__.py");
            std::fs::write(&first, "").unwrap();
            assert_eq!(next(&mut changes).await, [first]);
            // An editor's save: write a temp file, rename it over the module.
            let module = package.join("views.py");
            let temp = package.join("views.py.tmp");
            std::fs::write(&temp, "y = 1\n").unwrap();
            std::fs::rename(&temp, &module).unwrap();
            assert_eq!(next(&mut changes).await, [module]);
        });
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let error = runtime()
            .block_on(async { spawn(PathBuf::from("/nonexistent/app")) })
            .unwrap_err();
        assert!(error.to_string().contains("/nonexistent/app"), "{error}");
    }
}
