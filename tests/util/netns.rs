//! Network namespaces for partition tests: a star of one *hub* namespace (where a server runs)
//! and N *host* namespaces, each joined to the hub by its own veth pair, addressed from the
//! benchmarking range 198.18.0.0/15 (RFC 2544). Traffic flows only between a host and the hub;
//! nothing is added to the test's own namespace. Names are unique per test run, and every
//! namespace (with its links) is removed on drop, also when the test fails.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::require_tool;

/// The hub's address, on its loopback device: every host reaches it through its own link.
pub const HUB_ADDRESS: &str = "198.18.255.1";

/// Distinguishes stars made by one test process.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The hub and its hosts; removed on drop.
pub struct Star {
    hub: String,
    hosts: Vec<String>,
    /// Every namespace created so far (the hub first), for the drop guard.
    created: Vec<String>,
}

/// Runs `ip ARGS`, failing the test with `ip`'s own words when it fails.
fn ip(args: &[&str]) -> Output {
    let ip = require_tool("ip", "apt-get install -y iproute2");
    let output = Command::new(ip)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run `ip {}`: {error}", args.join(" ")));
    assert!(
        output.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    output
}

impl Star {
    /// A hub and `hosts` host namespaces. Host `i`'s link is `198.18.i.2/24` (its side) to
    /// `198.18.i.1/24` (the hub's side), with a route to [`HUB_ADDRESS`] through it. Fails the
    /// test with a clear message when namespaces cannot be made (not root, no CAP_SYS_ADMIN).
    pub fn new(hosts: usize) -> Star {
        assert!(hosts < 255, "at most 254 hosts on one hub");
        let prefix = format!(
            "sauna-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut star = Star {
            hub: format!("{prefix}-hub"),
            hosts: (0..hosts)
                .map(|index| format!("{prefix}-h{index}"))
                .collect(),
            created: Vec::new(),
        };
        let names: Vec<String> = [star.hub.clone()]
            .into_iter()
            .chain(star.hosts.iter().cloned())
            .collect();
        for name in names {
            star.add_namespace(&name);
        }
        let hub = star.hub.clone();
        ip(&[
            "-n",
            &hub,
            "addr",
            "add",
            &format!("{HUB_ADDRESS}/32"),
            "dev",
            "lo",
        ]);
        for (index, host) in star.hosts.iter().enumerate() {
            let (host_link, hub_link) = (format!("h{index}"), format!("hub{index}"));
            // Both ends are created inside their namespaces: no name ever exists in ours.
            ip(&[
                "link", "add", &host_link, "netns", host, "type", "veth", "peer", "name",
                &hub_link, "netns", &hub,
            ]);
            let (host_address, hub_address) =
                (format!("198.18.{index}.2"), format!("198.18.{index}.1"));
            ip(&[
                "-n",
                host,
                "addr",
                "add",
                &format!("{host_address}/24"),
                "dev",
                &host_link,
            ]);
            ip(&[
                "-n",
                &hub,
                "addr",
                "add",
                &format!("{hub_address}/24"),
                "dev",
                &hub_link,
            ]);
            ip(&["-n", host, "link", "set", &host_link, "up"]);
            ip(&["-n", &hub, "link", "set", &hub_link, "up"]);
            ip(&[
                "-n",
                host,
                "route",
                "add",
                &format!("{HUB_ADDRESS}/32"),
                "via",
                &hub_address,
            ]);
        }
        star
    }

    fn add_namespace(&mut self, name: &str) {
        let ip_path = require_tool("ip", "apt-get install -y iproute2");
        let output = Command::new(ip_path)
            .args(["netns", "add", name])
            .output()
            .unwrap_or_else(|error| panic!("cannot run `ip netns add`: {error}"));
        assert!(
            output.status.success(),
            "`ip netns add {name}` failed: {}\nthe partition tests need network namespaces: run \
             them as root (or with CAP_SYS_ADMIN and CAP_NET_ADMIN) on a kernel that allows \
             `ip netns` (in a container: --privileged or --cap-add SYS_ADMIN,NET_ADMIN)",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        self.created.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    /// The hub's namespace.
    pub fn hub(&self) -> &str {
        &self.hub
    }

    /// Host `index`'s namespace.
    pub fn host(&self, index: usize) -> &str {
        &self.hosts[index]
    }

    /// `ip netns exec NAMESPACE PROGRAM`: `program` run inside `namespace` (same pid: `ip`
    /// execs it).
    pub fn exec(namespace: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(require_tool("ip", "apt-get install -y iproute2"));
        command.args(["netns", "exec", namespace]).arg(program);
        command
    }

    /// Cuts host `index` off the hub: its link goes down on the hub's side, so packets in both
    /// directions are dropped while both ends keep their TCP state.
    pub fn cut(&self, index: usize) {
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &format!("hub{index}"),
            "down",
        ]);
    }

    /// Restores host `index`'s link.
    pub fn restore(&self, index: usize) {
        ip(&["-n", &self.hub, "link", "set", &format!("hub{index}"), "up"]);
    }
}

impl Drop for Star {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends (and so their peers); a process still in
        // one keeps it alive only until it exits.
        for name in self.created.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}
