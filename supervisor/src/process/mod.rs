//! Operating-system process plumbing shared by the web workers and the programs: spawning a child
//! the one safe way and forwarding its output (`spawn`), the group reaper that kills what is left
//! of the children's process groups when the supervisor dies (`reaper`), reading `/proc`
//! (`procfs`), and the restart backoff and crash window (`backoff`). Nothing here decides when a
//! process starts or stops; the pool and the program actors do.

pub mod backoff;
pub mod procfs;
pub mod reaper;
pub mod spawn;
