//! The Unix listener (ipc-protocol.md section 1).
//!
//! - The socket file has its mode from the moment it exists: the umask is set around `bind`,
//!   never a `chmod` afterwards (a window in which anyone could connect).
//! - An existing path is probed: if a server answers a connect, we refuse to start rather than
//!   steal its socket; if nobody answers, the file is stale and replaced. A path that is not a
//!   socket at all is left alone: it may be somebody's file.
//! - At shutdown the file is removed only if it is still the one we bound (same inode).

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use mio::net::UnixListener;
use rustix::fs::Mode;

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

/// A bound listener and the identity of the file it created.
pub struct BoundSocket {
    pub listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
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
        // The umask is process-wide; this runs before any other thread exists.
        let old = rustix::process::umask(Mode::from_bits_truncate(!mode & 0o777));
        let bound = UnixListener::bind(path);
        rustix::process::umask(old);
        let listener = bound.map_err(|source| ListenError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        let meta = std::fs::symlink_metadata(path).map_err(|source| ListenError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(BoundSocket {
            listener,
            path: path.to_path_buf(),
            inode: (meta.dev(), meta.ino()),
        })
    }

    /// Removes the socket file if it is still ours; returns whether it did.
    pub fn remove_file(&self) -> bool {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.inode => {
                std::fs::remove_file(&self.path).is_ok()
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
