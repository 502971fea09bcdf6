//! `Network`: openraft's transport between members, on gRPC (tonic) — the client side
//! (`RaftNetworkFactory`, one `Connection` per target) and the server side ([`RaftService`],
//! which hands each request to the local `Raft`).
//!
//! Each RPC carries openraft's request, and back its `Result`, postcard-encoded in a
//! `RaftMessage` (`proto/raft.proto`). Connections to one address share one HTTP/2 channel,
//! made lazily, so a member that is down costs nothing until it is called and is found again
//! once it is back. Every call has a deadline (openraft's time to live for the RPC); a member
//! that cannot be reached is `Unreachable`, which makes openraft back off.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode, Raft, RaftTypeConfig};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use timber_proto::raft::raft_transport_client::RaftTransportClient;
use timber_proto::raft::raft_transport_server::{RaftTransport, RaftTransportServer};
use timber_proto::raft::RaftMessage;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

/// The encoding of `RaftMessage::payload` this build speaks.
const WIRE_VERSION: u32 = 1;
/// Messages up to this size (snapshot chunks are smaller; a batch of entries may be large).
pub(crate) const MAX_MESSAGE: usize = 256 << 20;

type RpcError<E = openraft::error::Infallible> = RPCError<u64, BasicNode, RaftError<u64, E>>;

/// Creates the connections of one member to the others. Clones share the channels.
#[derive(Clone)]
pub struct Network<C> {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    connect_timeout: Duration,
    /// The address connections leave from (`None`: the one the OS picks).
    source: Option<std::net::IpAddr>,
    _config: PhantomData<fn() -> C>,
}

impl<C> std::fmt::Debug for Network<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network").field("connect_timeout", &self.connect_timeout).finish()
    }
}

impl<C> Network<C> {
    /// A transport whose connection attempts give up after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        Network {
            channels: Arc::new(Mutex::new(HashMap::new())),
            connect_timeout,
            source: None,
            _config: PhantomData,
        }
    }

    /// Connections leave from `ip` (a member's own Raft address, so that the others, and
    /// firewalls between them, see every connection of a member come from one address).
    pub fn from_address(mut self, ip: Option<std::net::IpAddr>) -> Self {
        self.source = ip;
        self
    }

    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock();
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad member address {addr:?}: {e}"))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .local_address(self.source)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// The connection of one member to another.
pub struct Connection<C> {
    target: u64,
    client: Result<RaftTransportClient<Channel>, String>,
    _config: PhantomData<fn() -> C>,
}

impl<C> std::fmt::Debug for Connection<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("target", &self.target).finish_non_exhaustive()
    }
}

impl<C> RaftNetworkFactory<C> for Network<C>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode>,
{
    type Network = Connection<C>;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Connection<C> {
        let client = self.channel(&node.addr).map(|ch| {
            RaftTransportClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE)
        });
        Connection { target, client, _config: PhantomData }
    }
}

fn encode<T: Serialize>(value: &T) -> Result<RaftMessage, postcard::Error> {
    Ok(RaftMessage { version: WIRE_VERSION, payload: postcard::to_stdvec(value)?.into() })
}

fn decode<T: DeserializeOwned>(msg: &RaftMessage) -> Result<T, String> {
    if msg.version != WIRE_VERSION {
        return Err(format!(
            "raft message of encoding version {}, this member speaks {WIRE_VERSION}",
            msg.version
        ));
    }
    postcard::from_bytes(&msg.payload).map_err(|e| format!("undecodable raft message: {e}"))
}

fn network_error<E: std::error::Error>(e: impl Into<AnyError>) -> RpcError<E> {
    RPCError::Network(NetworkError::from(e.into()))
}

/// A failed call: a member that could not be reached (refused, reset, no route, connect
/// timeout) is `Unreachable`; anything else (deadline, refusal of the message) a network error.
fn status_error<E: std::error::Error>(s: Status) -> RpcError<E> {
    let any = AnyError::error(format!("{}: {}", s.code(), s.message()));
    match s.code() {
        Code::Unavailable | Code::Unknown if !s.message().contains("deadline") => {
            RPCError::Unreachable(Unreachable::from(any))
        }
        _ => RPCError::Network(NetworkError::from(any)),
    }
}

impl<C> Connection<C>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode>,
{
    #[expect(clippy::result_large_err, reason = "the error type is openraft's")]
    fn prepare<Req: Serialize, E: std::error::Error>(
        &self,
        rpc: &Req,
        ttl: Duration,
    ) -> Result<(RaftTransportClient<Channel>, Request<RaftMessage>), RpcError<E>> {
        let client = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::from(AnyError::error(e)))),
        };
        let msg = encode(rpc).map_err(|e| network_error(AnyError::new(&e)))?;
        let mut req = Request::new(msg);
        req.set_timeout(ttl);
        Ok((client, req))
    }

    #[expect(clippy::result_large_err, reason = "the error type is openraft's")]
    fn finish<Resp, E>(
        &self,
        reply: Result<Response<RaftMessage>, Status>,
    ) -> Result<Resp, RpcError<E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let reply = reply.map_err(status_error)?;
        let result: Result<Resp, RaftError<u64, E>> =
            decode(reply.get_ref()).map_err(|e| network_error(AnyError::error(e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl<C> RaftNetwork<C> for Connection<C>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode>,
{
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcError> {
        let (mut client, req) = self.prepare(&rpc, option.hard_ttl())?;
        let reply = client.append_entries(req).await;
        self.finish(reply)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<C>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcError<InstallSnapshotError>> {
        let (mut client, req) = self.prepare(&rpc, option.hard_ttl())?;
        let reply = client.install_snapshot(req).await;
        self.finish(reply)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcError> {
        let (mut client, req) = self.prepare(&rpc, option.hard_ttl())?;
        let reply = client.vote(req).await;
        self.finish(reply)
    }
}

/// The receiving side: hands every RPC to the local `Raft`.
pub struct RaftService<C: RaftTypeConfig> {
    raft: Raft<C>,
}

impl<C: RaftTypeConfig> std::fmt::Debug for RaftService<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService").finish_non_exhaustive()
    }
}

impl<C> RaftService<C>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode, SnapshotData = std::io::Cursor<Vec<u8>>>,
{
    /// The tonic service for `raft`, to add to a server.
    pub fn server(raft: Raft<C>) -> RaftTransportServer<RaftService<C>> {
        RaftTransportServer::new(RaftService { raft })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

fn request<T: DeserializeOwned>(req: Request<RaftMessage>) -> Result<T, Status> {
    decode(req.get_ref()).map_err(Status::invalid_argument)
}

fn reply<T: Serialize>(result: &T) -> Result<Response<RaftMessage>, Status> {
    encode(result).map(Response::new).map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl<C> RaftTransport for RaftService<C>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode, SnapshotData = std::io::Cursor<Vec<u8>>>,
{
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<C> = request(req)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<u64> = request(req)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: InstallSnapshotRequest<C> = request(req)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }
}
