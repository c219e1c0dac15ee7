//! A real nginx (Debian's) in front of the controller, configured as the NixOS module
//! configures it (`recommendedProxySettings` and `proxyWebsockets`: HTTP/1.1 upgrades
//! passed on, `X-Forwarded-For` with the client appended), speaking plain HTTP on both
//! sides. One process (no master), so that killing it when dropped stops it whole.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

#[derive(Debug)]
pub struct Nginx {
    child: Child,
}

impl Nginx {
    /// nginx listening on each of `listen` (HOST:PORT), proxying to `upstream`
    /// (HOST:PORT, plain HTTP) from that same host address, whichever address a client
    /// came to (as from 127.0.0.1 to a controller on 127.0.0.1); its files in `dir`.
    pub fn start(dir: &Path, listen: &[&str], upstream: &str) -> Result<Nginx> {
        std::fs::create_dir_all(dir.join("logs"))?;
        let listens: String = listen.iter().map(|l| format!("    listen {l};\n")).collect();
        let conf = format!(
            "pid {dir}/nginx.pid;\nerror_log {dir}/logs/error.log warn;\nmaster_process off;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
             fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
             map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n\
             server {{\n{listens}\
                 location / {{\n\
                   proxy_pass http://{upstream};\n\
                   proxy_bind {source};\n\
                   proxy_http_version 1.1;\n\
                   proxy_set_header Upgrade $http_upgrade;\n\
                   proxy_set_header Connection $connection_upgrade;\n\
                   proxy_set_header Host $host;\n\
                   proxy_set_header X-Real-IP $remote_addr;\n\
                   proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
                   proxy_set_header X-Forwarded-Proto $scheme;\n\
                   proxy_read_timeout 1h;\n\
                 }}\n\
               }}\n\
             }}\n",
            dir = dir.display(),
            source = upstream.rsplit_once(':').map_or(upstream, |(h, _)| h),
        );
        let file = dir.join("nginx.conf");
        std::fs::write(&file, conf)?;
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&file)
            .arg("-p")
            .arg(dir)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("logs/stderr"))?)
            .spawn()
            .context("starting nginx (Debian: nginx; scripts/setup.sh installs it)")?;
        let n = Nginx { child };
        for l in listen {
            crate::wait_for(&format!("nginx to listen on {l}"), Duration::from_secs(10), || {
                std::net::TcpStream::connect(l).ok().map(|_| ())
            });
        }
        Ok(n)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
