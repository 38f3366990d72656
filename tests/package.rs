//! The Debian package: built with `cargo deb` from the test build of the
//! binary and the generated man pages and completions, then checked with
//! `dpkg-deb`: every file, the conffiles, the maintainer scripts, and that the
//! packaged configuration is valid for a real install.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The package built once for all tests of this file, because they run in
/// parallel and share the assets folder.
static PACKAGE: OnceLock<(PathBuf, Vec<String>)> = OnceLock::new();

/// Returns the package and the man pages generated for it.
fn package() -> &'static (PathBuf, Vec<String>) {
    PACKAGE.get_or_init(|| {
        let out = Path::new(SLUICE).parent().unwrap().join("package-test");
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        build_package(&out)
    })
}

/// Builds the package into `out` and returns its path and the man pages
/// generated for it.
fn build_package(out: &Path) -> (PathBuf, Vec<String>) {
    // The package's asset paths start with target/release, which cargo-deb
    // maps to the folder of the selected profile: here the test build.
    let profile_dir = Path::new(SLUICE).parent().unwrap();
    let target_dir = profile_dir.parent().unwrap();
    let assets = profile_dir.join("assets");
    let _ = std::fs::remove_dir_all(&assets);
    run(Command::new(SLUICE).arg("generate-assets").arg(&assets));
    let man = assets.join("man/man1");
    let mut pages: Vec<String> = std::fs::read_dir(&man)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for page in &pages {
        run(Command::new("gzip").args(["-9nf"]).arg(man.join(page)));
    }

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args(["deb", "--no-build", "--profile", "dev", "--output"])
        .arg(out)
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR")));
    let deb = out.join(format!("sluice_{}-1_amd64.deb", env!("CARGO_PKG_VERSION")));
    assert!(deb.exists(), "{} not built", deb.display());
    (deb, pages.iter().map(|page| format!("{page}.gz")).collect())
}

#[test]
fn package_holds_exactly_the_expected_files() {
    let (deb, man_pages) = package();

    let listing = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    let mut files: Vec<String> = listing
        .lines()
        .filter(|line| !line.starts_with('d'))
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            format!("{} {} {}", fields[0], fields[1], fields[5])
        })
        .collect();
    files.sort();

    let mut expected: Vec<String> = [
        "-rwxr-xr-x 0/0 ./usr/bin/sluice",
        "-rw-r--r-- 0/0 ./etc/sluice/gateway.toml",
        "-rw-r--r-- 0/0 ./etc/sluice/rules/acme.toml",
        "-rw-r--r-- 0/0 ./etc/sluice/rules/historian.toml",
        "-rw-r--r-- 0/0 ./usr/lib/systemd/system/sluice.service",
        "-rw-r--r-- 0/0 ./usr/share/bash-completion/completions/sluice",
        "-rw-r--r-- 0/0 ./usr/share/zsh/vendor-completions/_sluice",
        "-rw-r--r-- 0/0 ./usr/share/fish/vendor_completions.d/sluice.fish",
        "-rw-r--r-- 0/0 ./usr/share/doc/sluice/README.md",
        "-rw-r--r-- 0/0 ./usr/share/doc/sluice/operations.md",
        "-rw-r--r-- 0/0 ./usr/share/doc/sluice/copyright",
    ]
    .iter()
    .map(|line| line.to_string())
    .collect();
    assert!(man_pages.contains(&"sluice.1.gz".to_owned()));
    assert!(man_pages.contains(&"sluice-ctl.1.gz".to_owned()));
    for page in man_pages {
        expected.push(format!("-rw-r--r-- 0/0 ./usr/share/man/man1/{page}"));
    }
    expected.sort();
    assert_eq!(files, expected);
}

#[test]
fn package_control_lists_conffiles_and_scripts() {
    let out = tempfile::tempdir().unwrap();
    let (deb, _) = package();

    let fields = run(Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .args(["Package", "Section", "Depends"]));
    assert_eq!(
        fields,
        "Package: sluice\nSection: net\nDepends: libc6 (>= 2.34), passwd\n"
    );

    let conffiles = run(Command::new("dpkg-deb").arg("-I").arg(deb).arg("conffiles"));
    assert_eq!(
        conffiles,
        "/etc/sluice/gateway.toml\n/etc/sluice/rules/acme.toml\n/etc/sluice/rules/historian.toml\n"
    );

    let control = out.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control));
    let mut scripts: Vec<String> = std::fs::read_dir(&control)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    scripts.sort();
    assert_eq!(
        scripts,
        ["conffiles", "control", "postinst", "postrm", "prerm"]
    );

    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("groupadd --system sluice"), "{postinst}");
    assert!(
        postinst.contains("useradd --system --gid sluice"),
        "{postinst}"
    );
    assert!(
        postinst.contains(
            "install -d -o sluice -g sluice -m 0750 /var/lib/sluice /var/lib/sluice/audit"
        ),
        "{postinst}"
    );
    assert!(!postinst.contains("#DEBHELPER#"), "{postinst}");
    let postrm = std::fs::read_to_string(control.join("postrm")).unwrap();
    assert!(
        postrm.contains("rm -rf /var/lib/sluice /run/sluice"),
        "{postrm}"
    );
}

#[test]
fn packaged_configuration_is_valid_for_an_install() {
    let out = tempfile::tempdir().unwrap();
    let (deb, _) = package();
    let root = out.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));

    let config = root.join("etc/sluice/gateway.toml");
    let checked = run(Command::new(SLUICE)
        .arg("check")
        .arg("--config")
        .arg(&config));
    assert_eq!(
        checked,
        format!("{}: configuration valid\n", config.display())
    );

    let (service, _) = sluice::config::load_service(&config).unwrap();
    assert_eq!(service.user.as_deref(), Some("sluice"));
    assert!(!service.allow_root);
    let admin = service.admin.unwrap();
    assert_eq!(admin.socket, PathBuf::from("/run/sluice/control.sock"));
    assert_eq!(admin.group, None);
    let (policy, _) = sluice::policy::Policy::load(&config).unwrap();
    assert_eq!(policy.audit().path, PathBuf::from("/var/lib/sluice/audit"));

    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/sluice.service")).unwrap();
    assert_eq!(unit, include_str!("../systemd/sluice.service"));
}
