//! Settings shared by the property tests (`fuzz_*` modules): a case count small enough for the
//! suite, raised for a long run by `PROPTEST_CASES` (see `benches/fuzz.sh`).

use proptest::test_runner::Config;

/// A proptest configuration running `cases` cases, or `$PROPTEST_CASES` when it is set (every
/// other `PROPTEST_*` variable applies as proptest documents). Failures are not persisted into
/// the source tree: the failing test prints its minimal input, which is what a report needs.
pub fn config(cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config.failure_persistence = None;
    config
}
