//! nginx for tests: a site `emit nginx` wrote, wrapped in a main config whose every path is in
//! the sandbox (pid, logs, temp files), run in the foreground as one process so it needs no
//! system directories and dies with the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Daemon, Sandbox, assert_success, require_tool, run};

/// How to install it on Debian.
pub const APT: &str = "apt-get install -y nginx";

/// The nginx binary, or a test failure naming the install command.
pub fn binary() -> PathBuf {
    require_tool("nginx", APT)
}

/// Writes `nginx/nginx.conf` in the sandbox: one process, no daemon, temp files, pid and the
/// main error log in the sandbox, and `site` included in its `http` block.
pub fn main_conf(sandbox: &Sandbox, site: &Path) -> PathBuf {
    std::fs::create_dir_all(sandbox.path("nginx/tmp")).expect("nginx temp dir");
    std::fs::create_dir_all(sandbox.path("logs")).expect("log dir");
    sandbox.write(
        "nginx/nginx.conf",
        &format!(
            "daemon off;\nmaster_process off;\npid {root}/nginx/nginx.pid;\nerror_log {root}/logs/main-error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n    access_log off;\n    client_body_temp_path {root}/nginx/tmp/body;\n    proxy_temp_path {root}/nginx/tmp/proxy;\n    fastcgi_temp_path {root}/nginx/tmp/fastcgi;\n    uwsgi_temp_path {root}/nginx/tmp/uwsgi;\n    scgi_temp_path {root}/nginx/tmp/scgi;\n    include {site};\n}}\n",
            root = sandbox.root().display(),
            site = site.display()
        ),
    )
}

/// `nginx` with the sandbox as its prefix and `main` as its config, logging to stderr.
pub fn command(nginx: &Path, sandbox: &Sandbox, main: &Path) -> Command {
    let mut command = Command::new(nginx);
    command
        .arg("-p")
        .arg(sandbox.path("nginx"))
        .arg("-c")
        .arg(main)
        .args(["-e", "stderr"]);
    command
}

/// Checks `site` with `nginx -t` (failing with nginx's complaint and the site), starts nginx
/// serving it and waits until `port` accepts connections.
pub fn serve(sandbox: &Sandbox, site: &Path, port: u16) -> Daemon {
    let nginx = binary();
    let main = main_conf(sandbox, site);
    let check = run(command(&nginx, sandbox, &main).arg("-t"));
    assert_success(
        &check,
        &format!(
            "nginx -t of\n{}\n",
            std::fs::read_to_string(site).unwrap_or_default()
        ),
    );
    let mut daemon = Daemon::spawn("nginx", &mut command(&nginx, sandbox, &main));
    daemon.wait_for_port(port);
    daemon
}
