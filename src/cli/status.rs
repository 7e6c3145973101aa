//! `meshpilot proxy-status` and `meshpilot config-dump`: the operator's view,
//! read from the admin API.

use anyhow::Context;

use super::http;
use crate::admin::SyncStatus;
use crate::xds::resource::ResourceType;

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// meshpilot's admin address.
    #[arg(long, default_value = "127.0.0.1:15014", env = "MESHPILOT_ADMIN_ADDR")]
    pub admin_addr: String,
}

#[derive(Debug, clap::Args)]
pub struct ConfigDumpArgs {
    /// The proxy's node id.
    pub proxy: String,
    /// Only these types (comma-separated: CDS,EDS,LDS,RDS,SDS).
    #[arg(long)]
    pub types: Option<String>,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Renders the `proxy-status` table (and any NACK messages below it).
pub fn render_status_table(rows: &[SyncStatus]) -> String {
    let header =
        ["NAME", "CLUSTER", "MODE"].into_iter().chain(ResourceType::STATUS_COLUMNS.map(ResourceType::short_name)).chain(["VERSION", "IDENTITY"]);
    let mut table: Vec<Vec<String>> = vec![header.map(str::to_string).collect()];
    let mut errors = Vec::new();
    let vhds = ResourceType::VirtualHost.short_name();
    for row in rows {
        let mut line = vec![row.proxy.clone(), row.cluster.clone(), row.mode.clone()];
        for ty in ResourceType::STATUS_COLUMNS {
            let mut state = row.types.get(ty.short_name()).map(|t| t.state.clone()).unwrap_or_else(|| "NOT SENT".into());
            // Over delta ADS the routes' virtual hosts come by VHDS: the RDS cell tells when they lag.
            if ty == ResourceType::Route
                && let Some(hosts) = row.types.get(vhds).filter(|v| v.state != "SYNCED")
            {
                state = format!("{state} ({vhds} {})", hosts.state);
            }
            line.push(state);
        }
        // Every type's rejections, SDS's and VHDS's included, in push order.
        for col in ResourceType::PUSH_ORDER.map(ResourceType::short_name) {
            if let Some(err) = row.types.get(col).and_then(|t| t.last_error.as_ref()) {
                let one_line = err.split_whitespace().collect::<Vec<_>>().join(" ");
                errors.push(format!("{} {col}: {one_line}", row.proxy));
            }
        }
        for warning in &row.warnings {
            errors.push(format!("{} WARNING: {warning}", row.proxy));
        }
        line.push(row.envoy_version.clone());
        line.push(if row.identity.is_empty() { "-".into() } else { row.identity.clone() });
        table.push(line);
    }
    let widths: Vec<usize> = (0..table[0].len()).map(|i| table.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &table {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    if !errors.is_empty() {
        out.push_str("\nREJECTED (NACK):\n");
        for e in errors {
            out.push_str(&format!("  {e}\n"));
        }
    }
    out
}

pub async fn proxy_status(args: AdminArgs) -> anyhow::Result<()> {
    let (code, body) = http::get(&args.admin_addr, "/debug/syncz").await?;
    anyhow::ensure!(code == 200, "meshpilot at {} answered {code}: {body}", args.admin_addr);
    let rows: Vec<SyncStatus> = serde_json::from_str(&body).context("parsing /debug/syncz")?;
    print!("{}", render_status_table(&rows));
    Ok(())
}

pub async fn config_dump(args: ConfigDumpArgs) -> anyhow::Result<()> {
    let mut path = format!("/debug/config_dump?proxy={}", urlencode(&args.proxy));
    if let Some(types) = &args.types {
        path.push_str(&format!("&types={}", urlencode(types)));
    }
    let (code, body) = http::get(&args.admin.admin_addr, &path).await?;
    anyhow::ensure!(code == 200, "meshpilot at {} answered {code}: {}", args.admin.admin_addr, body.trim());
    let json: serde_json::Value = serde_json::from_str(&body)?;
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::TypeSync;

    fn synced() -> TypeSync {
        TypeSync { state: "SYNCED".into(), resource_count: 1, ..crate::admin::not_sent() }
    }

    #[test]
    fn table_has_istioctl_columns_and_lists_nacks() {
        let ok = synced();
        let mut bad = ok.clone();
        bad.state = "ERROR".into();
        bad.last_error = Some("Error adding/updating listener(s) x".into());
        let row = SyncStatus {
            proxy: "productpage-1".into(),
            cluster: "management-plane".into(),
            namespace: "default".into(),
            role: "sidecar".into(),
            mode: "sotw".into(),
            conn_id: 1,
            connected_at_unix: 0.0,
            envoy_version: "1.40.0".into(),
            identity: "unproven".into(),
            warnings: Vec::new(),
            types: [("CDS".into(), ok.clone()), ("LDS".into(), bad), ("EDS".into(), ok.clone()), ("RDS".into(), ok)].into(),
        };
        let out = render_status_table(&[row]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NAME") && lines[0].contains("CDS") && lines[0].ends_with("VERSION   IDENTITY"));
        assert!(lines[1].contains("SYNCED") && lines[1].contains("ERROR") && lines[1].ends_with("unproven"));
        assert!(out.contains("productpage-1 LDS: Error adding/updating listener(s) x"));
        assert_eq!(urlencode("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn a_rejected_virtual_host_shows_in_the_rds_cell_and_the_nack_list() {
        let ok = synced();
        let bad = TypeSync { state: "ERROR".into(), last_error: Some("weights exceed 4294967295".into()), ..ok.clone() };
        let types = ["CDS", "LDS", "EDS", "RDS"].iter().map(|t| (t.to_string(), ok.clone())).chain([("VHDS".into(), bad)]).collect();
        let row = SyncStatus {
            proxy: "productpage-1".into(),
            cluster: "management-plane".into(),
            namespace: "default".into(),
            role: "sidecar".into(),
            mode: "delta".into(),
            conn_id: 1,
            connected_at_unix: 0.0,
            envoy_version: "1.40.0".into(),
            identity: "unproven".into(),
            warnings: Vec::new(),
            types,
        };
        let out = render_status_table(&[row]);
        assert!(out.lines().nth(1).unwrap().contains("SYNCED (VHDS ERROR)"), "{out}");
        assert!(out.contains("productpage-1 VHDS: weights exceed 4294967295"), "{out}");
    }
}
