//! Integration tests that run the real `sauna-supervisor` binary; one module per feature.
// `check`: every config problem at once as FILE:LINE:COL (golden output), exit status.
mod check;
mod lifecycle;
mod util;
