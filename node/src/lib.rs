//! `tern-node`: everything a user's Tern node is.
//!
//! Layers, each importing only those below it:
//! 1. [`config`], [`data_dir`], [`store`], [`ticket`], [`events`], [`crypto`]: no network,
//!    no tasks;
//! 2. [`identity`], [`net`] (the one task that owns the libp2p Swarm);
//! 3. capabilities: [`messaging`], [`presence`] (groups, media as later issues add them);
//! 4. [`node`]: starts and wires everything, hands out [`NodeHandle`];
//! 5. [`api`]: serves a [`NodeHandle`] over local JSON-RPC. The node never imports the API.

pub mod api;
pub mod config;
pub mod crypto;
pub mod data_dir;
pub mod events;
pub mod identity;
pub mod messaging;
pub mod net;
pub mod node;
pub mod presence;
pub mod relay;
pub mod store;
pub mod ticket;

pub use config::{Config, Overrides};
pub use data_dir::DataDir;
pub use identity::Identity;
pub use libp2p::{Multiaddr, PeerId};
pub use node::{Node, NodeError, NodeHandle, NodeInfo, NodeOptions, NodeStatus, offline_ticket};
pub use ticket::ContactTicket;
