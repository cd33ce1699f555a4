//! The cluster's certificate authority and the TLS configuration of the
//! replica links.
//!
//! `ballot cert init` makes a CA; `ballot cert node ID` issues replica `ID` a
//! certificate whose only name is `node-ID`, usable as a server and a client
//! certificate. Replicas accept a peer only if its certificate chains to the
//! cluster CA (mutual TLS), and then only as the replica its name says.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::RootCertStore;

/// ALPN protocol of replica links; the number is the frame format.
pub const ALPN: &[u8] = b"ballot-peer/1";

crate::message_error!(
    /// A TLS set-up failure, with the file it concerns.
    Error
);

/// The name a replica's certificate carries.
pub fn node_name(id: u32) -> String {
    format!("node-{id}")
}

/// File names inside a certificate directory.
pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}
pub fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca-key.pem")
}
pub fn node_cert_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("node-{id}.pem"))
}
pub fn node_key_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("node-{id}-key.pem"))
}

fn write_private(path: &Path, contents: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error(format!("writing {}: {e}", path.display())))?;
    f.write_all(contents.as_bytes())
        .map_err(|e| Error(format!("writing {}: {e}", path.display())))
}

fn write_public(path: &Path, contents: &str) -> Result<(), Error> {
    std::fs::write(path, contents).map_err(|e| Error(format!("writing {}: {e}", path.display())))
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error(format!("reading {}: {e}", path.display())))
}

fn rc(context: &str, e: rcgen::Error) -> Error {
    Error(format!("{context}: {e}"))
}

/// Creates a new cluster CA in `dir` (`ca.pem`, `ca-key.pem`). Refuses to
/// overwrite an existing one.
pub fn init_ca(dir: &Path, cluster: &str) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error(format!("creating {}: {e}", dir.display())))?;
    if ca_cert_path(dir).exists() {
        return Err(Error(format!(
            "{} already exists; remove it to make a new CA",
            ca_cert_path(dir).display()
        )));
    }
    let key = KeyPair::generate().map_err(|e| rc("generating the CA key", e))?;
    let mut params = CertificateParams::new(Vec::new()).map_err(|e| rc("CA parameters", e))?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Ballot cluster CA ({cluster})"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params
        .self_signed(&key)
        .map_err(|e| rc("signing the CA", e))?;
    write_private(&ca_key_path(dir), &key.serialize_pem())?;
    write_public(&ca_cert_path(dir), &cert.pem())
}

/// Issues replica `id` a certificate signed by the CA in `dir`.
pub fn issue_node(dir: &Path, id: u32) -> Result<(), Error> {
    let ca_key =
        KeyPair::from_pem(&read(&ca_key_path(dir))?).map_err(|e| rc("reading the CA key", e))?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_cert_path(dir))?, ca_key)
        .map_err(|e| rc("reading the CA certificate", e))?;
    let key = KeyPair::generate().map_err(|e| rc("generating a node key", e))?;
    let mut params =
        CertificateParams::new(vec![node_name(id)]).map_err(|e| rc("node parameters", e))?;
    params
        .distinguished_name
        .push(DnType::CommonName, node_name(id));
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| rc("signing the node certificate", e))?;
    write_private(&node_key_path(dir, id), &key.serialize_pem())?;
    write_public(&node_cert_path(dir, id), &cert.pem())
}

/// The files a replica presents and trusts.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Loaded TLS material for one replica.
pub struct Identity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_err(path: &Path, e: rustls::pki_types::pem::Error) -> Error {
    Error(format!("reading {}: {e}", path.display()))
}

/// The CA certificates in a PEM file (at least one).
fn read_roots(path: &Path) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(path).map_err(|e| pem_err(path, e))? {
        let ca = ca.map_err(|e| pem_err(path, e))?;
        roots
            .add(ca)
            .map_err(|e| Error(format!("{} is not a usable CA: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(Error(format!("{} holds no certificate", path.display())));
    }
    Ok(roots)
}

/// A certificate chain from a PEM file (at least one certificate).
fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if chain.is_empty() {
        return Err(Error(format!("{} holds no certificate", path.display())));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_err(path, e))
}

impl Identity {
    pub fn load(files: &TlsFiles) -> Result<Identity, Error> {
        Ok(Identity {
            roots: Arc::new(read_roots(&files.ca)?),
            chain: read_chain(&files.cert)?,
            key: read_key(&files.key)?,
        })
    }

    /// Server side of replica links: a client certificate from the cluster
    /// CA is required.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, Error> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| Error(format!("client verifier: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error(format!("TLS versions: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| Error(format!("node certificate: {e}")))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// Client side of replica links: presents this replica's certificate and
    /// trusts only the cluster CA.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, Error> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error(format!("TLS versions: {e}")))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| Error(format!("node certificate: {e}")))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

/// Checks that a (chain-verified) peer certificate names replica `id`.
pub fn certifies(cert: &CertificateDer<'_>, id: u32) -> Result<(), String> {
    let parsed = ParsedCertificate::try_from(cert).map_err(|e| e.to_string())?;
    let name = ServerName::try_from(node_name(id)).map_err(|e| e.to_string())?;
    rustls::client::verify_server_name(&parsed, &name).map_err(|e| e.to_string())
}

/// Whether a (chain-verified) certificate carries the DNS name `name`.
pub fn names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(parsed) = ParsedCertificate::try_from(cert) else {
        return false;
    };
    ServerName::try_from(name.to_string())
        .is_ok_and(|n| rustls::client::verify_server_name(&parsed, &n).is_ok())
}

// ----- the client API's certificates ----------------------------------

/// The name a client certificate for `name` carries: prefixed, so that no
/// client certificate can ever name a replica (`node-N`).
pub fn client_name(name: &str) -> String {
    format!("client-{name}")
}
pub fn api_cert_path(dir: &Path) -> PathBuf {
    dir.join("api.pem")
}
pub fn api_key_path(dir: &Path) -> PathBuf {
    dir.join("api-key.pem")
}
pub fn client_cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{}.pem", client_name(name)))
}
pub fn client_key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{}-key.pem", client_name(name)))
}

/// Issues the client API's server certificate (`api.pem`), valid for
/// `hosts` (DNS names or IP addresses) and always for `localhost`,
/// `127.0.0.1` and `::1`. Serving only: it cannot stand for a replica.
pub fn issue_api_server(dir: &Path, hosts: &[String]) -> Result<(), Error> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    issue_leaf(
        dir,
        names,
        "Ballot client API",
        ExtendedKeyUsagePurpose::ServerAuth,
        (&api_cert_path(dir), &api_key_path(dir)),
    )
}

/// Issues a client certificate for `name` (`client-NAME.pem`): what a
/// client presents to the API over mutual TLS.
pub fn issue_client(dir: &Path, name: &str) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(Error(format!(
            "{name:?}: a client name is 1 to 64 of a-z, 0-9 and -"
        )));
    }
    issue_leaf(
        dir,
        vec![client_name(name)],
        &client_name(name),
        ExtendedKeyUsagePurpose::ClientAuth,
        (&client_cert_path(dir, name), &client_key_path(dir, name)),
    )
}

fn issue_leaf(
    dir: &Path,
    names: Vec<String>,
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
    (cert_path, key_path): (&Path, &Path),
) -> Result<(), Error> {
    let ca_key =
        KeyPair::from_pem(&read(&ca_key_path(dir))?).map_err(|e| rc("reading the CA key", e))?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_cert_path(dir))?, ca_key)
        .map_err(|e| rc("reading the CA certificate", e))?;
    let key = KeyPair::generate().map_err(|e| rc("generating a key", e))?;
    let mut params = CertificateParams::new(names).map_err(|e| rc("certificate names", e))?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| rc("signing the certificate", e))?;
    write_private(key_path, &key.serialize_pem())?;
    write_public(cert_path, &cert.pem())
}

/// The client API's TLS files (`[api_tls]` in a replica's configuration).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct ApiTls {
    /// The API's certificate and key (`ballot cert server`).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Verify client certificates against this CA. A client need not
    /// present one (tokens still work), but one it presents must chain to
    /// it, or the handshake fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

impl ApiTls {
    /// The rustls configuration the client listener serves with.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, Error> {
        let chain = read_chain(&self.cert)?;
        let key = read_key(&self.key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error(format!("TLS versions: {e}")))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(read_roots(ca)?),
                    provider(),
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| Error(format!("client verifier: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| Error(format!("{}: {e}", self.cert.display())))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}
