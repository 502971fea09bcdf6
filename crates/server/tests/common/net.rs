//! `Links`: TCP proxies between cluster members, for partitions without root.
//!
//! Member `i` listens for Raft on `127.0.0.{i}` (its connections to the others leave from that
//! address too), and the cluster knows each member by the address of its proxy. A proxy knows
//! which member a connection comes from by its source address, so each directed link can be
//! cut: cutting closes the link's open connections and closes new ones at once, until healed.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// The loopback address member `i` (1-based) listens on and connects from.
pub fn member_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, i as u8))
}

fn member_of(ip: IpAddr) -> Option<usize> {
    match ip {
        IpAddr::V4(v4) if v4.octets()[..3] == [127, 0, 0] => Some(v4.octets()[3] as usize),
        _ => None,
    }
}

#[derive(Default)]
struct State {
    /// Cut links, (from, to).
    cut: HashSet<(usize, usize)>,
    /// Open connections: (from, to) and the two sockets.
    open: Vec<((usize, usize), TcpStream, TcpStream)>,
}

/// The proxies of one cluster.
#[derive(Clone, Default)]
pub struct Links {
    state: Arc<Mutex<State>>,
}

impl Links {
    /// A proxy for member `to` forwarding to `upstream`; returns the address to give the
    /// cluster for that member.
    pub fn proxy(&self, to: usize, upstream: SocketAddr) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = self.state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let from = conn.peer_addr().ok().and_then(|a| member_of(a.ip())).unwrap_or(0);
                if state.lock().unwrap().cut.contains(&(from, to)) {
                    let _ = conn.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(up) = TcpStream::connect(upstream) else {
                    let _ = conn.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = (conn.set_nodelay(true), up.set_nodelay(true));
                {
                    let mut st = state.lock().unwrap();
                    if st.cut.contains(&(from, to)) {
                        continue;
                    }
                    st.open.push(((from, to), conn.try_clone().unwrap(), up.try_clone().unwrap()));
                }
                pipe(conn.try_clone().unwrap(), up.try_clone().unwrap());
                pipe(up, conn);
            }
        });
        addr
    }

    /// Cuts member `a` off from every member in `others`, both ways.
    pub fn isolate(&self, a: usize, others: &[usize]) {
        let links: Vec<_> = others.iter().flat_map(|&b| [(a, b), (b, a)]).collect();
        self.cut(&links);
    }

    /// Cuts the directed links `(from, to)`: what `from` sends on connections it opened to
    /// `to` (its requests and their replies); `to`'s own connections to `from` stay.
    pub fn cut(&self, links: &[(usize, usize)]) {
        let mut st = self.state.lock().unwrap();
        st.cut.extend(links.iter().copied());
        let cut = st.cut.clone();
        st.open.retain(|(link, x, y)| {
            if cut.contains(link) {
                let _ = (x.shutdown(Shutdown::Both), y.shutdown(Shutdown::Both));
                false
            } else {
                true
            }
        });
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.state.lock().unwrap().cut.clear();
    }
}

/// Copies `from` to `to` until either closes.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = (from.shutdown(Shutdown::Both), to.shutdown(Shutdown::Both));
    });
}
