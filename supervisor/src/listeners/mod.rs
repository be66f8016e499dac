//! Every socket the supervisor listens on — the web front's `[web].listen` addresses, the
//! `[metrics].listen` endpoint and the control socket — is made, handed over and accepted on
//! here, the same way for each role:
//! - `bind`: binding an address with the configured backlog and close-on-exec (TCP there, a Unix
//!   path in `unix`: the stale-socket-file rules, an optional private mode and parent
//!   directory), and adopting a descriptor inherited in an upgrade;
//! - `table`: the [`FdTable`], the listening sockets by role and address, which the old
//!   supervisor fills for an upgrade and its successor reads back and takes from;
//! - `accept`: [`AcceptBackoff`], the one accept loop that pauses instead of spinning when the
//!   process is out of descriptors or memory.
//!
//! It does not decide who listens where (the config does), who may connect (the control socket
//! checks its peers), nor what a connection is for (each role serves its own); nor does it spawn
//! the successor or talk to it (`supervisor::upgrade`).

mod accept;
mod bind;
mod table;
mod unix;

pub use accept::AcceptBackoff;
pub use bind::{
    BindError, Listener, Options, SocketError, Step, adopt, adopt_tcp, adopt_unix, bind, bind_all,
    bind_tcp,
};
pub use table::{ClaimError, FdTable, Role, Row, claim_inherited};
pub use unix::bind_unix;
