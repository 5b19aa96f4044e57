//! The Unix listener (ipc-protocol.md section 1).
//!
//! - The socket file has its mode from the moment it is visible at its path. It is bound inside
//!   a fresh private (0700) directory beside the target, given its mode there, and renamed into
//!   place: no window in which a wider mode is reachable, and no process-wide umask change that
//!   could race with another thread's file creation (tests bind from many threads at once, and
//!   socket activation or helper threads may exist before a bind).
//! - An existing path is probed: if a server answers a connect, we refuse to start rather than
//!   steal its socket; if nobody answers, the file is stale and replaced. A path that is not a
//!   socket at all is left alone: it may be somebody's file.
//! - At shutdown the file is removed only if it is still the one we bound (same inode), and
//!   never for a listener inherited from systemd (socket activation): its socket unit created
//!   the file and keeps listening on it across our restarts.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::sync::atomic::{AtomicU64, Ordering};

use mio::net::UnixListener;
use rustix::fs::{renameat_with, RenameFlags, CWD};

use crate::config::MAX_SOCKET_PATH;

/// Why the listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "another gateway is listening on {0}; stop it first or choose another CGW_IPC_SOCKET_PATH"
    )]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it (choose another CGW_IPC_SOCKET_PATH)")]
    NotASocket(PathBuf),
    #[error("cannot remove the stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
}

/// A listener and, if this process created its file, the identity of that file.
pub struct BoundSocket {
    pub listener: UnixListener,
    /// The file we bound, as (path, (dev, inode)); `None` for an inherited listener, whose
    /// file is not ours to remove.
    created: Option<(PathBuf, (u64, u64))>,
}

impl BoundSocket {
    /// Binds `path` with file mode `mode`, replacing a stale socket and refusing a live one.
    pub fn bind(path: &Path, mode: u32) -> Result<BoundSocket, ListenError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ListenError::NotASocket(path.to_path_buf()))
            }
            Ok(_) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ListenError::InUse(path.to_path_buf()));
                }
                tracing::warn!(event = "stale_socket_replaced", component = "ipc_bridge", path = %path.display());
                std::fs::remove_file(path).map_err(|source| ListenError::RemoveStale {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            Err(_) => {}
        }
        let listener = bind_privately(path, mode).map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => ListenError::InUse(path.to_path_buf()),
            _ => ListenError::Bind {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let meta = std::fs::symlink_metadata(path).map_err(|source| ListenError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(BoundSocket {
            listener,
            created: Some((path.to_path_buf(), (meta.dev(), meta.ino()))),
        })
    }

    /// A listener systemd bound and passed in (socket activation); expected non-blocking.
    pub fn inherited(listener: std::os::unix::net::UnixListener) -> BoundSocket {
        BoundSocket {
            listener: UnixListener::from_std(listener),
            created: None,
        }
    }

    /// Removes the socket file if this process created it and it is still that file; returns
    /// whether it did.
    pub fn remove_file(&self) -> bool {
        let Some((path, inode)) = &self.created else {
            return false;
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if (meta.dev(), meta.ino()) == *inode => std::fs::remove_file(path).is_ok(),
            _ => false,
        }
    }
}

/// Distinguishes the private directories of binds that run at the same time in one process.
static PRIVATE_DIR_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Binds a listener at `path` whose file has `mode` before it appears there.
///
/// The socket is bound as `<dir>/.cgw-<pid>-<n>/s`, chmod-ed inside that 0700 directory (which
/// only its owner can enter), then renamed to `path` with `RENAME_NOREPLACE`: if another
/// gateway bound `path` since the stale check, the rename fails with `AlreadyExists` instead
/// of stealing its path. The private directory is removed in every case.
fn bind_privately(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private_dir = parent.join(format!(
        ".cgw-{}-{}",
        std::process::id(),
        PRIVATE_DIR_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let temp_socket = private_dir.join("s");
    if temp_socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the private bind path {} is longer than {MAX_SOCKET_PATH} bytes; \
                 choose a CGW_IPC_SOCKET_PATH in a shorter directory",
                temp_socket.display()
            ),
        ));
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private_dir)?;
    let result = (|| {
        // The umask may have narrowed the directory further; 0700 exactly is what we want.
        std::fs::set_permissions(&private_dir, std::fs::Permissions::from_mode(0o700))?;
        let listener = UnixListener::bind(&temp_socket)?;
        std::fs::set_permissions(&temp_socket, std::fs::Permissions::from_mode(mode & 0o777))?;
        renameat_with(CWD, &temp_socket, CWD, path, RenameFlags::NOREPLACE)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&temp_socket);
    let _ = std::fs::remove_dir(&private_dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cgw-listener-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("gw.sock")
    }

    #[test]
    fn binds_with_the_mode_refuses_live_replaces_stale() {
        let path = temp_path("modes");
        let first = BoundSocket::bind(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            BoundSocket::bind(&path, 0o600),
            Err(ListenError::InUse(_))
        ));
        drop(first); // the file stays: stale now
        let second = BoundSocket::bind(&path, 0o660).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(second.remove_file());
        assert!(!path.exists());
    }

    /// Binds with different modes from 8 threads at once, 1000 times in all, and checks that
    /// every socket has exactly its own mode (the old umask-around-bind failed this: one
    /// thread's umask restore landed inside another's bind).
    #[test]
    fn concurrent_binds_each_get_their_own_mode() {
        let dir = temp_path("concurrent");
        let modes = [0o600, 0o660, 0o666, 0o640, 0o700, 0o620, 0o604, 0o770];
        std::thread::scope(|scope| {
            for (t, &mode) in modes.iter().enumerate() {
                let dir = dir.clone();
                scope.spawn(move || {
                    for i in 0..125 {
                        let path = dir.with_file_name(format!("t{t}-{i}.sock"));
                        let bound = BoundSocket::bind(&path, mode).unwrap();
                        let got = std::fs::symlink_metadata(&path)
                            .unwrap()
                            .permissions()
                            .mode();
                        assert_eq!(got & 0o777, mode, "thread {t}, bind {i}");
                        assert!(bound.remove_file());
                    }
                });
            }
        });
        let leftovers: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            leftovers.is_empty(),
            "private bind directories left: {leftovers:?}"
        );
    }

    #[test]
    fn leaves_a_regular_file_alone() {
        let path = temp_path("file");
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            BoundSocket::bind(&path, 0o600),
            Err(ListenError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }

    /// An inherited listener's file belongs to whoever bound it (systemd's socket unit).
    #[test]
    fn never_removes_the_file_of_an_inherited_listener() {
        let path = temp_path("inherited");
        let std_listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let inherited = BoundSocket::inherited(std_listener);
        assert!(!inherited.remove_file());
        assert!(path.exists());
    }

    #[test]
    fn does_not_remove_a_file_that_replaced_ours() {
        let path = temp_path("replaced");
        let bound = BoundSocket::bind(&path, 0o600).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        assert!(!bound.remove_file());
        assert!(path.exists());
    }
}
