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

impl Identity {
    pub fn load(files: &TlsFiles) -> Result<Identity, Error> {
        let pem_err = |path: &Path, e: rustls::pki_types::pem::Error| {
            Error(format!("reading {}: {e}", path.display()))
        };
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&files.ca).map_err(|e| pem_err(&files.ca, e))? {
            let ca = ca.map_err(|e| pem_err(&files.ca, e))?;
            roots
                .add(ca)
                .map_err(|e| Error(format!("{} is not a usable CA: {e}", files.ca.display())))?;
        }
        if roots.is_empty() {
            return Err(Error(format!(
                "{} holds no certificate",
                files.ca.display()
            )));
        }
        let chain = CertificateDer::pem_file_iter(&files.cert)
            .map_err(|e| pem_err(&files.cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(&files.cert, e))?;
        if chain.is_empty() {
            return Err(Error(format!(
                "{} holds no certificate",
                files.cert.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| pem_err(&files.key, e))?;
        Ok(Identity {
            roots: Arc::new(roots),
            chain,
            key,
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
