//! The receive buffers of the mesh's UDP sockets.
//!
//! QUIC runs over one UDP socket per listening address. The kernel queues
//! the datagrams that arrive for it until the endpoint's task reads them;
//! when the queue's buffer is full, what arrives is dropped, and QUIC
//! takes the drop for congestion: it resends, and halves its window. The
//! default buffer (`net.core.rmem_default`, 208 KiB on Debian) holds about
//! a millisecond of a fast transfer, and on a small edge machine the
//! endpoint's task is often off the CPU for longer than that while the
//! daemon checks and writes what it received (issue 14: on the benchmark
//! machine, 1.2 % of the datagrams of a 1 GiB artifact were dropped on
//! loopback with the default, none with 4 MiB).
//!
//! libp2p's QUIC transport creates and binds its sockets itself and
//! offers no hook to size them, so the mesh finds them once they listen:
//! the UDP sockets of this process bound to a listening port, taken by a
//! duplicate of their descriptor (`pidfd_getfd` on our own process, which
//! needs no privilege), and asks for [`Config::udp_receive_buffer`]. The
//! kernel caps what an unprivileged process gets at `net.core.rmem_max`;
//! a process with `CAP_NET_ADMIN` (root) goes past the cap, as QUIC
//! stacks such as quic-go do.
//!
//! [`Config::udp_receive_buffer`]: crate::Config::udp_receive_buffer

/// What one socket's receive buffer is after [`enlarge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// The socket's descriptor in this process.
    pub fd: i32,
    /// Its receive buffer as the kernel reports it (`SO_RCVBUF`: the kernel
    /// counts its own overhead too, and reports twice what was asked).
    pub bytes: usize,
    /// Whether that is at least what was asked.
    pub enough: bool,
}

/// Asks for a receive buffer of `want` bytes on every UDP socket of this
/// process bound to `port`; returns what each got (none if no socket is
/// bound to it), or why the sockets could not be looked at.
#[cfg(target_os = "linux")]
pub fn enlarge(port: u16, want: usize) -> Result<Vec<Buffer>, String> {
    use rustix::net::sockopt;
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};

    let me = pidfd_open(getpid(), PidfdFlags::empty()).map_err(|e| format!("pidfd_open: {e}"))?;
    let dir = std::fs::read_dir("/proc/self/fd").map_err(|e| format!("/proc/self/fd: {e}"))?;
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // Only sockets (the link reads `socket:[inode]`); a descriptor
        // closed meanwhile is simply skipped.
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|l| l.as_os_str().as_encoded_bytes().starts_with(b"socket:"));
        if !is_socket {
            continue;
        }
        let fd = match pidfd_getfd(&me, n, PidfdGetfdFlags::empty()) {
            Ok(fd) => fd,
            // Closed meanwhile.
            Err(rustix::io::Errno::BADF) => continue,
            // Not allowed here (a seccomp filter, a kernel before 5.6).
            Err(e) => return Err(format!("pidfd_getfd: {e}")),
        };
        if sockopt::socket_type(&fd).ok() != Some(rustix::net::SocketType::DGRAM) {
            continue;
        }
        let bound = rustix::net::getsockname(&fd)
            .ok()
            .and_then(|a| std::net::SocketAddr::try_from(a).ok());
        if bound.map(|a| a.port()) != Some(port) {
            continue;
        }
        let got = |fd: &std::os::fd::OwnedFd| sockopt::socket_recv_buffer_size(fd).unwrap_or(0);
        if got(&fd) < want {
            // The kernel doubles what it is asked for (its own overhead).
            // Within `net.core.rmem_max` for anyone; past it with
            // CAP_NET_ADMIN. A refusal leaves the buffer as it was.
            let _ = sockopt::set_socket_recv_buffer_size(&fd, want / 2);
            if got(&fd) < want {
                let _ = sockopt::set_socket_recv_buffer_size_force(&fd, want / 2);
            }
        }
        let bytes = got(&fd);
        out.push(Buffer {
            fd: n,
            bytes,
            enough: bytes >= want,
        });
    }
    Ok(out)
}

/// Elsewhere the sockets keep the system's buffers.
#[cfg(not(target_os = "linux"))]
pub fn enlarge(_port: u16, _want: usize) -> Result<Vec<Buffer>, String> {
    Ok(Vec::new())
}
