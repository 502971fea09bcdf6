//! Forwarding: a member that does not lead passes a client's command to the leader, which runs
//! it with the [`Executor`] its server installed and returns the encoded reply. The cluster
//! crate carries the bytes; what a command is and how its reply is encoded is the server's.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use timber_proto::raft::forward_client::ForwardClient;
use timber_proto::raft::forward_server::{Forward, ForwardServer};
use timber_proto::raft::{ForwardedCommand, ForwardedReply};
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};

/// A reply on its way.
pub type Reply = std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>> + Send>>;

/// Runs a forwarded command on the leader: `(protocol, args)` → the encoded reply.
pub type Executor = Arc<dyn Fn(u32, Vec<Bytes>) -> Reply + Send + Sync>;

/// The executor a member's endpoint runs forwarded commands with, once its server set it.
pub(crate) type Slot = Arc<OnceLock<Executor>>;

pub(crate) struct Service {
    slot: Slot,
}

pub(crate) fn server(slot: Slot) -> ForwardServer<Service> {
    ForwardServer::new(Service { slot })
        .max_decoding_message_size(crate::network::MAX_MESSAGE)
        .max_encoding_message_size(crate::network::MAX_MESSAGE)
}

#[tonic::async_trait]
impl Forward for Service {
    async fn execute(
        &self,
        req: Request<ForwardedCommand>,
    ) -> Result<Response<ForwardedReply>, Status> {
        let Some(exec) = self.slot.get() else {
            return Err(Status::unavailable("this member does not run commands yet"));
        };
        let c = req.into_inner();
        let encoded = exec(c.protocol, c.args).await;
        Ok(Response::new(ForwardedReply { encoded: encoded.into() }))
    }
}

/// Sends a command over `channel` to the member at `addr` and returns its encoded reply.
pub(crate) async fn send(
    channel: tonic::transport::Channel,
    addr: &str,
    protocol: u32,
    args: Vec<Bytes>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let mut client = ForwardClient::new(channel)
        .max_decoding_message_size(crate::network::MAX_MESSAGE)
        .max_encoding_message_size(crate::network::MAX_MESSAGE);
    let mut req = Request::new(ForwardedCommand { protocol, args });
    req.set_timeout(timeout);
    match client.execute(req).await {
        Ok(r) => Ok(r.into_inner().encoded.to_vec()),
        Err(s) => {
            Err(Error::Unavailable(format!("forwarding to the leader at {addr}: {}", s.message())))
        }
    }
}
