//! Binary upgrade: a new `gateway run --upgrade` process takes the listening sockets over
//! from the running one through a unix socket (`server.upgrade_socket`, mode 0600), the
//! way Pingora and HAProxy (`-x`) hand listeners over, so no connection waiting in an
//! accept queue is reset and no address is ever unbound.
//!
//! The exchange, one connection per attempt (the old process serves attempts one at a
//! time, and an attempt that fails leaves it as it was):
//!
//! ```text
//! new → old   "gateway-upgrade 1\n"                          magic and protocol version
//! old → new   u32 length (big endian), then the header text:
//!             "gateway-upgrade 1\ngeneration G\nlistener ADDR\n…\nadmin ADDR\n
//!              xdp INTERFACE MODE PIN\n…\nend\n"   (the XDP links, pinned for the
//!             moment of the handover: see `xdp::guard::XdpGuard::pin_links_for_handover`)
//! old → new   the descriptors, in header order, in batches of at most 253 (the kernel's
//!             SCM_MAX_FD): each batch one message, a u32 count carrying SCM_RIGHTS
//! new → old   "drain\n"        once its workers hold the sockets (accepting nothing yet)
//! old → new   "draining\n"     the old process stops accepting and drains; the new one
//!                              starts accepting
//! ```
//!
//! Every socket of every worker is handed over (each worker has its own `SO_REUSEPORT`
//! socket per listener), and the new process accepts on all of them: closing one would
//! drop the connections queued on it unless `net.ipv4.tcp_migrate_req=1`.

use crate::control::Control;
use crate::xdp::guard::Attachment;
use crate::xdp::XdpMode;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const MAGIC: &str = "gateway-upgrade";
const VERSION: u32 = 1;
/// The kernel's SCM_MAX_FD: descriptors one message may carry.
const MAX_FDS_PER_MESSAGE: usize = 253;
/// Longest header the new process accepts (a hostile peer cannot make it allocate more).
const MAX_HEADER: u32 = 1 << 20;
/// How long a step of the exchange may take before the attempt is abandoned.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the old process waits for "drain" after handing the sockets over: the new
/// process resolves names, reads certificates and starts its workers in between.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// What the new process received: its generation and the sockets, by bound address.
pub struct Handover {
    /// The old process's generation; the new one is this plus one.
    pub old_generation: u64,
    pub listeners: Vec<(SocketAddr, OwnedFd)>,
    pub admin: Option<(SocketAddr, OwnedFd)>,
    /// The old process's XDP links, each pinned at the path given, for the new program to
    /// replace the old one on (step 4).
    pub xdp: Vec<(Attachment, PathBuf)>,
    stream: UnixStream,
}

impl Handover {
    /// Step 5: tells the old process to drain and waits for it to say so.
    pub fn finish(mut self) -> Result<(), String> {
        let context = |e: io::Error| format!("telling the old process to drain: {e}");
        self.stream.write_all(b"drain\n").map_err(context)?;
        match read_line(&mut self.stream).map_err(context)?.as_str() {
            "draining" => Ok(()),
            other => Err(format!(
                "the old process answered {other:?} instead of \"draining\""
            )),
        }
    }
}

/// Connects to the running process at `path` and receives its sockets (step 1).
pub fn take_over(path: &Path) -> Result<Handover, String> {
    let stream = UnixStream::connect(path)
        .map_err(|e| format!("upgrade socket {}: connect: {e}", path.display()))?;
    receive(path, stream)
}

/// [`take_over`] when a gateway listens at `path`; `None` when none does (no socket
/// file, or a stale one nobody listens on).
pub fn take_over_if_running(path: &Path) -> Result<Option<Handover>, String> {
    match UnixStream::connect(path) {
        Ok(stream) => receive(path, stream).map(Some),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(format!("upgrade socket {}: connect: {e}", path.display())),
    }
}

fn receive(path: &Path, mut stream: UnixStream) -> Result<Handover, String> {
    let at = |what: &str, e: io::Error| format!("upgrade socket {}: {what}: {e}", path.display());
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(STEP_TIMEOUT)))
        .map_err(|e| at("timeouts", e))?;
    stream
        .write_all(format!("{MAGIC} {VERSION}\n").as_bytes())
        .map_err(|e| at("hello", e))?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(|e| {
        at(
            "reading the header (is it a gateway of the same protocol version?)",
            e,
        )
    })?;
    let len = u32::from_be_bytes(len);
    if len > MAX_HEADER {
        return Err(format!("upgrade header of {len} bytes: too long"));
    }
    let mut header = vec![0u8; len as usize];
    stream
        .read_exact(&mut header)
        .map_err(|e| at("reading the header", e))?;
    let header = String::from_utf8(header).map_err(|_| "upgrade header: not UTF-8".to_string())?;
    let parsed = parse_header(&header)?;
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(parsed.sockets.len());
    while fds.len() < parsed.sockets.len() {
        let batch = recv_fds(&stream).map_err(|e| at("receiving descriptors", e))?;
        if batch.is_empty() {
            return Err("the old process sent a batch without descriptors".into());
        }
        fds.extend(batch);
    }
    if fds.len() != parsed.sockets.len() {
        return Err(format!(
            "the header names {} sockets, {} descriptors came",
            parsed.sockets.len(),
            fds.len()
        ));
    }
    let mut handover = Handover {
        old_generation: parsed.generation,
        listeners: Vec::new(),
        admin: None,
        xdp: parsed.xdp,
        stream,
    };
    for ((kind, addr), fd) in parsed.sockets.into_iter().zip(fds) {
        // The descriptor must be the socket the header says, or the new process would
        // serve a listener on the wrong address.
        let bound = socket2::SockRef::from(&fd)
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket());
        if bound != Some(addr) {
            return Err(format!(
                "descriptor said to be bound to {addr} is bound to {bound:?}"
            ));
        }
        match kind {
            Kind::Listener => handover.listeners.push((addr, fd)),
            Kind::Admin => handover.admin = Some((addr, fd)),
        }
    }
    Ok(handover)
}

#[derive(Debug, PartialEq)]
enum Kind {
    Listener,
    Admin,
}

#[derive(Debug)]
struct Header {
    generation: u64,
    sockets: Vec<(Kind, SocketAddr)>,
    xdp: Vec<(Attachment, PathBuf)>,
}

fn parse_header(text: &str) -> Result<Header, String> {
    let bad = |line: &str| format!("upgrade header: unexpected line {line:?}");
    let mut lines = text.lines();
    let hello = format!("{MAGIC} {VERSION}");
    match lines.next() {
        Some(l) if l == hello => {}
        other => {
            return Err(format!(
                "upgrade header: {other:?}, expected {hello:?} (a different protocol version?)"
            ))
        }
    }
    let generation = lines
        .next()
        .and_then(|l| l.strip_prefix("generation "))
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| "upgrade header: no generation".to_string())?;
    let mut sockets = Vec::new();
    let mut xdp = Vec::new();
    for line in lines {
        if line == "end" {
            return Ok(Header {
                generation,
                sockets,
                xdp,
            });
        }
        if let Some(link) = line.strip_prefix("xdp ") {
            let mut parts = link.splitn(3, ' ');
            let (Some(interface), Some(mode), Some(pin)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(bad(line));
            };
            let mode = match mode {
                "native" => XdpMode::Native,
                "generic" => XdpMode::Generic,
                _ => return Err(bad(line)),
            };
            xdp.push((
                Attachment {
                    interface: interface.to_owned(),
                    mode,
                },
                PathBuf::from(pin),
            ));
            continue;
        }
        let (kind, addr) = line.split_once(' ').ok_or_else(|| bad(line))?;
        let kind = match kind {
            "listener" => Kind::Listener,
            "admin" => Kind::Admin,
            _ => return Err(bad(line)),
        };
        sockets.push((kind, addr.parse().map_err(|_| bad(line))?));
    }
    Err("upgrade header: no end line".into())
}

/// Binds the upgrade socket at `path` (mode 0600), replacing a stale socket; refuses when
/// a process still listens there, and refuses anything at `path` that is not a socket
/// (never deletes a file it did not make).
///
/// The socket is never reachable by another user, not even for an instant: it is bound
/// inside a fresh private directory (mode 0700, made next to `path`), chmod-ed to 0600
/// there, and only then renamed into place. Binding at `path` directly would leave it with
/// the umask's mode between `bind` and `chmod`, long enough for a local user to connect
/// first (the peer's uid check would then refuse it, but the mode is the first wall).
/// A umask around the bind would do too, but the umask is per process and worker threads
/// may be running.
pub fn listen(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            dir
        }
        None => Path::new("."),
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket: not replacing it",
                    path.display()
                ),
            ));
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process listens on it",
                ));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // A short name: a socket path is limited to 107 bytes.
    let private = dir.join(format!(".gw{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    // mkdir's mode is narrowed by the umask, never widened: 0700 at most.
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("s");
    let bound = UnixListener::bind(&staged).and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        // Atomically replaces a stale socket: the path never names a looser file.
        std::fs::rename(&staged, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// The old process's side: serves upgrade attempts on `listener` until one asks it to
/// drain, then sends the new generation on `drain` and returns. Runs on its own thread
/// (blocking I/O with timeouts: an attempt stalls nothing else).
pub fn serve(
    listener: UnixListener,
    control: Arc<Control>,
    admin: RawFd,
    generation: u64,
    drain: tokio::sync::mpsc::UnboundedSender<u64>,
) {
    for conn in listener.incoming() {
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "upgrade socket accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let attempt = hand_over(&mut stream, &control, admin, generation);
        if attempt.is_err() {
            // The new process may have replaced the program on a link already.
            if let Some(guard) = control
                .xdp
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
            {
                guard.restore_links();
            }
        }
        match attempt {
            Ok(()) => {
                // No further attempt may reach this process: the new one binds the path.
                drop(listener);
                tracing::info!(
                    generation,
                    new_generation = generation + 1,
                    "upgrade: a new process took the listeners over; draining"
                );
                let _ = drain.send(generation + 1);
                let _ = stream.write_all(b"draining\n");
                return;
            }
            // A connect and close without a word: `listen` of another gateway checking
            // whether the path is in use, not an upgrade attempt.
            Err(e) if e == PROBE => tracing::debug!("upgrade socket probed"),
            Err(e) => {
                tracing::warn!(error = %e, "upgrade attempt abandoned; this process keeps serving")
            }
        }
    }
}

/// What `hand_over` fails with when the peer closed before saying anything.
const PROBE: &str = "closed before the hello";

/// One attempt, up to the new process's "drain".
fn hand_over(
    stream: &mut UnixStream,
    control: &Control,
    admin: RawFd,
    generation: u64,
) -> Result<(), String> {
    let io = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
    // The sockets go only to this user or root, whatever the file's mode (a directory
    // that already existed with looser permissions, the moment between bind and chmod).
    let peer = peer_uid(stream).map_err(io("reading the peer's credentials"))?;
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    if peer != own && peer != 0 {
        return Err(format!(
            "refused a connection from uid {peer} (only uid {own} or root may take over)"
        ));
    }
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(STEP_TIMEOUT)))
        .map_err(io("timeouts"))?;
    let hello = match read_line(stream) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(PROBE.into()),
        hello => hello.map_err(io("reading the hello"))?,
    };
    if hello != format!("{MAGIC} {VERSION}") {
        return Err(format!("unexpected hello {hello:?}"));
    }
    // Duplicated under the lock: a worker removes its entry before closing the socket, so
    // every descriptor read here is open; the copies are this attempt's to close.
    let mut header = format!("{MAGIC} {VERSION}\ngeneration {generation}\n");
    let mut fds = Vec::new();
    {
        let listeners = control
            .shared
            .listener_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (addr, fd) in listeners.iter() {
            fds.push(dup(*fd).map_err(io("duplicating a listener"))?);
            header.push_str(&format!("listener {addr}\n"));
        }
    }
    let admin_copy = dup(admin).map_err(io("duplicating the admin listener"))?;
    if let Some(addr) = socket2::SockRef::from(&admin_copy)
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
    {
        header.push_str(&format!("admin {addr}\n"));
        fds.push(admin_copy);
    }
    if let Some(guard) = control
        .xdp
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
    {
        let pinned = guard
            .pin_links_for_handover()
            .map_err(|e| format!("handing the XDP links over: {}", e.detail()))?;
        for (attachment, pin) in pinned {
            header.push_str(&format!(
                "xdp {} {} {}\n",
                attachment.interface,
                attachment.mode,
                pin.display()
            ));
        }
    }
    header.push_str("end\n");
    stream
        .write_all(&(header.len() as u32).to_be_bytes())
        .and_then(|()| stream.write_all(header.as_bytes()))
        .map_err(io("sending the header"))?;
    for batch in fds.chunks(MAX_FDS_PER_MESSAGE) {
        send_fds(stream, batch).map_err(io("sending descriptors"))?;
    }
    drop(fds);
    stream
        .set_read_timeout(Some(HANDOVER_TIMEOUT))
        .map_err(io("timeouts"))?;
    match read_line(stream) {
        Ok(line) if line == "drain" => Ok(()),
        Ok(line) => Err(format!("the new process sent {line:?}")),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(
            "the new process closed the connection before it was ready (it failed or was stopped)"
                .into(),
        ),
        Err(e) => Err(format!("waiting for the new process: {e}")),
    }
}

/// Sends `state` to systemd's notification socket (`$NOTIFY_SOCKET`, sd_notify(3)) when
/// there is one: `READY=1`, and `MAINPID=` so that after a binary upgrade systemd follows
/// the new process (the unit needs `Type=notify` and `NotifyAccess=all`).
pub fn notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    let addr = match target.strip_prefix('@') {
        Some(name) => UnixAddr::from_abstract_name(name.as_bytes()),
        None => UnixAddr::from_pathname(&target),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr));
    if let Err(e) = sent {
        tracing::warn!(socket = %target, error = %e, "cannot notify systemd");
    }
}

/// The uid of the process at the other end (`SO_PEERCRED`, as of its connect).
fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live ucred.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller keeps open; the result is new.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `copy` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Reads one `\n`-terminated line of at most 64 bytes, a byte at a time: the bytes after
/// it (the descriptors' messages) must stay in the socket.
fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        stream.read_exact(&mut byte)?;
        if byte[0] == b'\n' {
            return String::from_utf8(line)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"));
        }
        if line.len() >= 64 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        line.push(byte[0]);
    }
}

/// Room for the control message of one full batch.
fn cmsg_space() -> usize {
    // SAFETY: CMSG_SPACE is arithmetic.
    unsafe { libc::CMSG_SPACE((MAX_FDS_PER_MESSAGE * size_of::<RawFd>()) as u32) as usize }
}

/// One message: the batch's count as payload, the descriptors as SCM_RIGHTS.
fn send_fds(stream: &UnixStream, fds: &[OwnedFd]) -> io::Result<()> {
    let count = (fds.len() as u32).to_be_bytes();
    let mut iov = libc::iovec {
        iov_base: count.as_ptr() as *mut libc::c_void,
        iov_len: count.len(),
    };
    let data_len = fds.len() * size_of::<RawFd>();
    let mut control = vec![0u8; cmsg_space()];
    // SAFETY: msghdr over a live iovec and control buffer; CMSG_* walk that buffer, which
    // has room for MAX_FDS_PER_MESSAGE descriptors (the caller's batches are no larger).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(data_len as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
        let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
        for (i, fd) in fds.iter().enumerate() {
            data.add(i).write_unaligned(fd.as_raw_fd());
        }
        if libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives one batch. The payload buffer is exactly one count long, so a read never
/// runs into the next batch (whose descriptors would otherwise be lost).
fn recv_fds(stream: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    let mut count = [0u8; 4];
    let mut iov = libc::iovec {
        iov_base: count.as_mut_ptr().cast(),
        iov_len: count.len(),
    };
    let mut control = vec![0u8; cmsg_space()];
    let mut fds = Vec::new();
    // SAFETY: as in `send_fds`; each descriptor SCM_RIGHTS delivers is new to this process
    // and owned once here.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() as _;
        let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..bytes / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if n as usize != count.len() || msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a truncated descriptor batch",
            ));
        }
    }
    if u32::from_be_bytes(count) as usize != fds.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a batch announced {} descriptors and carried {}",
                u32::from_be_bytes(count),
                fds.len()
            ),
        ));
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejects() {
        let h = parse_header(
            "gateway-upgrade 1\ngeneration 7\nlistener 127.0.0.1:80\nlistener [::1]:443\nadmin 127.0.0.1:9\nxdp eth0 native /sys/fs/bpf/gw/upgrade link\nend\n",
        )
        .unwrap();
        assert_eq!(h.generation, 7);
        assert_eq!(h.sockets.len(), 3);
        assert_eq!(h.xdp[0].0.interface, "eth0");
        assert_eq!(h.xdp[0].1, Path::new("/sys/fs/bpf/gw/upgrade link"));
        assert_eq!(h.sockets[2].0, Kind::Admin);
        assert!(parse_header("gateway-upgrade 2\ngeneration 1\nend\n").is_err());
        assert!(parse_header("gateway-upgrade 1\ngeneration 1\nlistener nowhere\nend\n").is_err());
        assert!(parse_header("gateway-upgrade 1\ngeneration 1\nlistener 127.0.0.1:80\n").is_err());
    }

    #[test]
    fn descriptors_cross_in_batches_larger_than_one_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let sockets: Vec<OwnedFd> = (0..300)
            .map(|_| OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap()))
            .collect();
        let sender = std::thread::spawn(move || {
            for batch in sockets.chunks(MAX_FDS_PER_MESSAGE) {
                send_fds(&a, batch).unwrap();
            }
        });
        let first = recv_fds(&b).unwrap();
        let second = recv_fds(&b).unwrap();
        sender.join().unwrap();
        assert_eq!((first.len(), second.len()), (253, 47));
    }
}
