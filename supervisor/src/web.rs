//! The web role: a pool of Python workers running the WSGI app behind an HTTP front. A request
//! flows front → dispatcher → worker slot and back; the pool decides the workers' lives but never
//! sees a request.
//! - `front`: accepts connections, parses HTTP/1.1, builds the WSGI environ and streams bodies;
//! - `dispatch`: the queue between the front and the workers' request slots;
//! - `pool`: the actor that starts, replaces, recycles, scales and rolls the workers;
//! - `worker`: one Python worker process, the shim it runs and the shared-memory frame protocol.

pub mod dispatch;
pub mod front;
pub mod pool;
pub mod worker;
