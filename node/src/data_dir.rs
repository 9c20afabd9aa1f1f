//! The node's data directory: where each file lives, its permissions, and the exclusive
//! lock that keeps a second daemon off the same directory.
//!
//! Layout of `<data-dir>` (mode 0700):
//! - `identity.key` (0600): the one ed25519 seed, see [`crate::identity`];
//! - `config.toml`: see [`crate::config`];
//! - `db/`: the sled database, see [`crate::store`];
//! - `daemon.lock`: held with an exclusive OS file lock while a node runs; holds its pid;
//! - `api.json` (0600): `{"url","token","pid"}` of the running daemon's local API.
//!
//! The lock is taken before the database is opened, so a second process gets the clear
//! "a Tern daemon already uses <dir> (pid N)" instead of a sled lock error.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

/// Errors about the data directory itself.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Another process holds the directory's lock.
    #[error("a Tern daemon already uses {dir} (pid {pid})")]
    InUse {
        /// The contested directory.
        dir: PathBuf,
        /// The pid recorded by the holder, or `?` when unreadable.
        pid: String,
    },
    /// The directory or one of its files could not be created or accessed.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An existing directory that other users may enter, without a Tern identity in it.
    #[error(
        "{dir} is shared (mode {mode:o}: writable by every user, or holding files that are \
         not Tern's) and holds no Tern identity; Tern keeps its keys in a directory of its \
         own: pass a new path (for example {dir}/tern)",
        dir = dir.display()
    )]
    Shared {
        /// The directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// No identity exists yet.
    #[error("no Tern identity in {dir}; create one with `tern init`")]
    NotInitialized {
        /// The directory without identity.
        dir: PathBuf,
    },
}

/// The paths of one node's data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Uses `root` as the data directory (nothing is created yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The OS default: `$XDG_DATA_HOME/tern` on Linux and the platform equivalent elsewhere.
    pub fn os_default() -> Option<Self> {
        directories::ProjectDirs::from("org", "Tern", "tern").map(|d| Self::new(d.data_dir()))
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `identity.key`.
    pub fn identity_path(&self) -> PathBuf {
        self.root.join("identity.key")
    }

    /// `config.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join(crate::config::Config::FILE_NAME)
    }

    /// `db/`.
    pub fn db_path(&self) -> PathBuf {
        self.root.join("db")
    }

    /// `events.log`: the event log for clients resuming with `since`.
    pub fn events_path(&self) -> PathBuf {
        self.root.join("events.log")
    }

    /// `api.json`.
    pub fn api_path(&self) -> PathBuf {
        self.root.join("api.json")
    }

    /// `daemon.lock`.
    pub fn lock_path(&self) -> PathBuf {
        self.root.join("daemon.lock")
    }

    /// Creates the directory (and parents) with mode 0700 if missing, and tightens the mode
    /// of an existing one that holds only Tern's files (or nothing, as after `mkdir` with
    /// any umask). An existing directory that every user may write to (`/tmp`), or that
    /// holds files of something else (a project folder), is refused
    /// ([`DataDirError::Shared`]) unless it holds an identity: its mode is not Tern's to
    /// change.
    pub fn create(&self) -> Result<(), DataDirError> {
        let io = |source| DataDirError::Io {
            path: self.root.clone(),
            source,
        };
        #[cfg(unix)]
        if let Ok(meta) = std::fs::metadata(&self.root) {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            let mut foreign = false;
            for entry in std::fs::read_dir(&self.root).map_err(io)? {
                let name = entry.map_err(io)?.file_name();
                foreign |= !is_terns(&name.to_string_lossy());
            }
            if mode & 0o077 != 0 && (mode & 0o002 != 0 || foreign) && !self.identity_path().exists()
            {
                return Err(DataDirError::Shared {
                    dir: self.root.clone(),
                    mode,
                });
            }
        }
        std::fs::create_dir_all(&self.root).map_err(io)?;
        set_mode(&self.root, 0o700).map_err(io)
    }

    /// Whether a process holds the directory's lock (a daemon runs on it, or is still
    /// stopping). False when there is no lock file.
    pub fn in_use(&self) -> Result<bool, DataDirError> {
        let path = self.lock_path();
        let io = |source| DataDirError::Io {
            path: path.clone(),
            source,
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(e)),
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(false),
            Err(std::fs::TryLockError::WouldBlock) => Ok(true),
            Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
        }
    }

    /// Takes the exclusive lock, or says which pid holds it.
    pub fn lock(&self) -> Result<DataDirLock, DataDirError> {
        self.create()?;
        let path = self.lock_path();
        let io = |source| DataDirError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // `in_use` (as `tern stop` polls it) holds a shared lock for a moment: a daemon
        // starting right then must not take that for another daemon.
        let deadline = std::time::Instant::now() + IN_USE_GRACE;
        let mut locked = file.try_lock();
        while matches!(locked, Err(std::fs::TryLockError::WouldBlock))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
            locked = file.try_lock();
        }
        match locked {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(DataDirError::InUse {
                    dir: self.root.clone(),
                    pid: if pid.is_empty() {
                        "?".into()
                    } else {
                        pid.into()
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(DataDirLock { _file: file })
    }
}

/// How long [`DataDir::lock`] tries again while the lock is held, before it says another
/// process holds it.
const IN_USE_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

/// Whether `name` is one of the files a node or a relay keeps in its data directory.
fn is_terns(name: &str) -> bool {
    matches!(
        name,
        "identity.key"
            | "config.toml"
            | "relay.toml"
            | "db"
            | "mailbox"
            | "events.log"
            | "api.json"
            | "daemon.lock"
    ) || name.starts_with("identity.")
        || name.starts_with("api.")
}

/// Holds the data directory's exclusive lock; released when dropped or when the process dies.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Writes `bytes` to `tmp` (created or truncated) with the given Unix mode, and syncs it.
fn write_synced(tmp: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let mut f = opts.open(tmp)?;
    set_mode(tmp, mode)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Writes `bytes` to `path` atomically (temp file + rename) with the given Unix mode.
pub(crate) fn write_private(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    write_synced(&tmp, bytes, mode)?;
    std::fs::rename(&tmp, path)
}

/// Writes `bytes` to a new file `path` with the given Unix mode, durably, and never over an
/// existing one: the bytes go to a temporary file of this process first, which is then
/// linked at `path` (an `AlreadyExists` error if anything is there, even a file created a
/// moment ago by another process), and the directory is synced.
pub(crate) fn write_private_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    if let Err(e) = write_synced(&tmp, bytes, mode) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked?;
    if let Some(parent) = path.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Sets Unix permission bits (no-op elsewhere).
pub(crate) fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    #[cfg(not(unix))]
    {
        let _ = (path, mode);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_shared_directory_is_refused_and_left_as_it_was() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        set_mode(&shared, 0o1777).unwrap();
        // Someone's folder with other things in it, readable by others.
        let project = tmp.path().join("project");
        std::fs::create_dir(&project).unwrap();
        std::fs::write(project.join("notes.txt"), b"x").unwrap();
        set_mode(&project, 0o755).unwrap();
        let err = DataDir::new(&project).create().unwrap_err();
        assert!(
            matches!(err, DataDirError::Shared { mode: 0o755, .. }),
            "{err}"
        );
        // An empty one of the user's (`mkdir`, umask 022 or 002) becomes Tern's, and so
        // does one holding only Tern's files (a config written before `tern init`).
        for (name, mode, file) in [
            ("fresh", 0o755, None),
            ("group", 0o775, None),
            ("configured", 0o755, Some("config.toml")),
            ("relay", 0o775, Some("relay.toml")),
        ] {
            let d = tmp.path().join(name);
            std::fs::create_dir(&d).unwrap();
            if let Some(f) = file {
                std::fs::write(d.join(f), b"").unwrap();
            }
            set_mode(&d, mode).unwrap();
            DataDir::new(&d).create().unwrap();
            let now = std::fs::metadata(&d).unwrap().permissions().mode() & 0o7777;
            assert_eq!(now, 0o700, "{name}");
        }
        let err = DataDir::new(&shared).create().unwrap_err();
        assert!(
            matches!(err, DataDirError::Shared { mode: 0o1777, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("mode 1777"), "{err}");
        let mode = std::fs::metadata(&shared).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o1777);
        // A subdirectory of it is fine, and so is a Tern directory whose mode was loosened.
        DataDir::new(shared.join("tern")).create().unwrap();
        let own = DataDir::new(tmp.path().join("own"));
        own.create().unwrap();
        std::fs::write(own.identity_path(), b"x").unwrap();
        set_mode(own.root(), 0o755).unwrap();
        own.create().unwrap();
        let mode = std::fs::metadata(own.root()).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn in_use_follows_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("node"));
        assert!(!dir.in_use().unwrap());
        let held = dir.lock().unwrap();
        assert!(dir.in_use().unwrap());
        drop(held);
        assert!(!dir.in_use().unwrap());
    }

    #[test]
    fn second_lock_names_the_holder_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("node"));
        let _held = dir.lock().unwrap();
        let err = dir.lock().unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("(pid {})", std::process::id())),
            "{msg}"
        );
        assert!(msg.starts_with("a Tern daemon already uses"), "{msg}");
    }

    #[test]
    fn lock_is_released_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        drop(dir.lock().unwrap());
        dir.lock().unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("d"));
        dir.create().unwrap();
        let mode = std::fs::metadata(dir.root()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
