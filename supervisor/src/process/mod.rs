//! Operating-system process plumbing shared by the web workers, the programs and the deploy hooks:
//! spawning a child the one safe way and forwarding its output (`spawn`), ending a child's whole
//! process group (`group`), the group reaper that kills what is left
//! of the children's process groups when the supervisor dies (`reaper`), and reading `/proc`
//! (`procfs`). Nothing here decides when a process starts or stops; the pool and the program
//! actors do.

pub mod group;
pub mod procfs;
pub mod reaper;
pub mod spawn;
