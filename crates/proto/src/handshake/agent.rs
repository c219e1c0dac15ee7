//! The agent's half of the handshake, without I/O: the messages it sends and the checks
//! of the controller's answers, as one value that moves through the steps. The agent
//! daemon and the benchmark's load agents drive it over their sockets.

use thymis_store::signing::{PublicKey, SecretKey};

use super::{Nonce, controller_transcript, device_transcript, enrollment_transcript, token_proof, welcome_message};
use crate::{AgentBound, ControllerBound, PROTOCOL_MAX, PROTOCOL_MIN};

/// Why the agent ends a handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("controller refused the connection: {0}")]
    Refused(String),
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("controller chose protocol {0}; this agent speaks {PROTOCOL_MIN}..={PROTOCOL_MAX}")]
    Protocol(u32),
    #[error("controller identity key {0:?} is not a public key")]
    BadKey(String),
    #[error("controller identity key {0} is not pinned in controller_identity_keys")]
    NotPinned(String),
    #[error("controller failed to prove its identity (bad handshake signature)")]
    BadChallenge,
    #[error("the controller's welcome (device {0:?}) is not signed by its identity key: refused")]
    BadWelcome(String),
}

/// The agent's side, from `Hello` to `Welcome`.
#[derive(Debug)]
pub struct AgentHandshake<'a> {
    key: &'a SecretKey,
    pinned: &'a [PublicKey],
    token: Option<String>,
    client_nonce: Nonce,
    /// After the challenge: the session and the controller's key.
    challenged: Option<(String, PublicKey, u32)>,
}

/// What a welcome established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcomed {
    pub session: String,
    pub device: String,
    pub config: String,
    pub heartbeat_secs: u64,
    pub dead_after_secs: u64,
    /// The controller's clock when it welcomed the agent.
    pub time: u64,
    pub controller_key: PublicKey,
    /// The protocol version the controller chose.
    pub protocol: u32,
}

impl<'a> AgentHandshake<'a> {
    /// A handshake with the device's `key`, trusting only the `pinned` controller keys;
    /// with `token`, it enrolls the key (the token itself never leaves). `client_nonce`
    /// must be fresh random bytes.
    pub fn new(key: &'a SecretKey, pinned: &'a [PublicKey], token: Option<String>, client_nonce: Nonce) -> Self {
        AgentHandshake { key, pinned, token, client_nonce, challenged: None }
    }

    /// Step 1.
    pub fn hello(&self, agent_version: &str) -> ControllerBound {
        ControllerBound::Hello {
            protocol_min: PROTOCOL_MIN,
            protocol_max: PROTOCOL_MAX,
            agent_version: agent_version.to_owned(),
            device_key: self.key.public().to_string(),
            client_nonce: self.client_nonce,
        }
    }

    /// Step 2 checked (the protocol, the key pinned, its signature), step 3 to send.
    pub fn on_challenge(&mut self, msg: AgentBound) -> Result<ControllerBound, HandshakeError> {
        let (protocol, controller_key, server_nonce, session, signature) = match msg {
            AgentBound::Challenge { protocol, controller_key, server_nonce, session, signature } => {
                (protocol, controller_key, server_nonce, session, signature)
            }
            AgentBound::Refused { reason } => return Err(HandshakeError::Refused(reason)),
            other => return Err(unexpected("a challenge", &other)),
        };
        if !(PROTOCOL_MIN..=PROTOCOL_MAX).contains(&protocol) {
            return Err(HandshakeError::Protocol(protocol));
        }
        let key: PublicKey = controller_key.parse().map_err(|_| HandshakeError::BadKey(controller_key.clone()))?;
        if !self.pinned.contains(&key) {
            return Err(HandshakeError::NotPinned(key.to_string()));
        }
        let device = self.key.public();
        let c = &self.client_nonce;
        if !key.verifies(&controller_transcript(c, &server_nonce, &session, &device), &signature) {
            return Err(HandshakeError::BadChallenge);
        }
        let enrollment_proof = self
            .token
            .take()
            .map(|t| token_proof(&t, &enrollment_transcript(c, &server_nonce, &session, &device, &key)));
        let signature = self.key.sign(&device_transcript(c, &server_nonce, &session, &key));
        self.challenged = Some((session, key, protocol));
        Ok(ControllerBound::Auth { signature, enrollment_token: None, enrollment_proof })
    }

    /// Step 4 checked: the name and configuration it gives are signed by the controller.
    pub fn on_welcome(self, msg: AgentBound) -> Result<Welcomed, HandshakeError> {
        let Some((session, controller_key, protocol)) = self.challenged else {
            return Err(unexpected("a challenge first", &msg));
        };
        match msg {
            AgentBound::Welcome { device, config, heartbeat_secs, dead_after_secs, time, signature } => {
                let signed = welcome_message(&session, &self.key.public(), &device, &config, time);
                if !signature.is_some_and(|s| controller_key.verifies(&signed, &s)) {
                    return Err(HandshakeError::BadWelcome(device));
                }
                Ok(Welcomed {
                    session,
                    device,
                    config,
                    heartbeat_secs,
                    dead_after_secs,
                    time,
                    controller_key,
                    protocol,
                })
            }
            AgentBound::Refused { reason } => Err(HandshakeError::Refused(reason)),
            other => Err(unexpected("a welcome", &other)),
        }
    }
}

fn unexpected(expected: &'static str, got: &AgentBound) -> HandshakeError {
    let mut got = format!("{got:?}");
    got.truncate(200);
    HandshakeError::Unexpected { expected, got }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{Proof, token_id, token_key};

    /// The controller's side, as the tests need it: a challenge and a welcome.
    fn challenge(ctl: &SecretKey, hello: &ControllerBound, server: Nonce, session: &str) -> AgentBound {
        let ControllerBound::Hello { device_key, client_nonce, .. } = hello else { panic!("hello") };
        let device: PublicKey = device_key.parse().expect("device key");
        AgentBound::Challenge {
            protocol: PROTOCOL_MAX,
            controller_key: ctl.public().to_string(),
            server_nonce: server,
            session: session.into(),
            signature: ctl.sign(&controller_transcript(client_nonce, &server, session, &device)),
        }
    }

    fn welcome(ctl: &SecretKey, device: &SecretKey, session: &str) -> AgentBound {
        let signed = welcome_message(session, &device.public(), "kiosk-1", "kiosk", 7);
        AgentBound::Welcome {
            device: "kiosk-1".into(),
            config: "kiosk".into(),
            heartbeat_secs: 5,
            dead_after_secs: 20,
            time: 7,
            signature: Some(ctl.sign(&signed)),
        }
    }

    #[test]
    fn a_pinned_controller_is_welcomed_and_the_token_goes_as_a_proof() {
        let (ctl, dev) = (SecretKey::generate("c").expect("key"), SecretKey::generate("d").expect("key"));
        let pinned = [ctl.public()];
        let token = "thymis-enroll-token".to_owned();
        let mut h = AgentHandshake::new(&dev, &pinned, Some(token.clone()), Nonce([1; 32]));
        let hello = h.hello("test");
        let auth = h.on_challenge(challenge(&ctl, &hello, Nonce([2; 32]), "s1")).expect("challenge");
        let ControllerBound::Auth { signature, enrollment_token, enrollment_proof } = auth else { panic!("auth") };
        assert_eq!(enrollment_token, None, "the token never crosses the wire");
        let proof = enrollment_proof.expect("a proof");
        let Proof::Signed { id, signature: proved } = Proof::parse(&proof) else { panic!("{proof}") };
        assert_eq!(id, token_id(&token));
        assert!(!proof.contains(&token));
        let bound = enrollment_transcript(&Nonce([1; 32]), &Nonce([2; 32]), "s1", &dev.public(), &ctl.public());
        assert!(token_key(&token).public().verifies(&bound, proved), "bound to this connection and key");
        let t = device_transcript(&Nonce([1; 32]), &Nonce([2; 32]), "s1", &ctl.public());
        assert!(dev.public().verifies(&t, &signature));
        let w = h.on_welcome(welcome(&ctl, &dev, "s1")).expect("welcome");
        assert_eq!((w.device.as_str(), w.config.as_str(), w.session.as_str()), ("kiosk-1", "kiosk", "s1"));
    }

    #[test]
    fn an_unpinned_or_lying_controller_is_refused() {
        let (ctl, dev, other) = (
            SecretKey::generate("c").expect("key"),
            SecretKey::generate("d").expect("key"),
            SecretKey::generate("o").expect("key"),
        );
        let pinned = [ctl.public()];
        let mut h = AgentHandshake::new(&dev, &pinned, None, Nonce([1; 32]));
        let hello = h.hello("test");
        let err = h.on_challenge(challenge(&other, &hello, Nonce([2; 32]), "s1")).expect_err("not pinned");
        assert!(matches!(err, HandshakeError::NotPinned(_)), "{err}");

        // The pinned key, but a signature over another connection's nonce.
        let mut h = AgentHandshake::new(&dev, &pinned, None, Nonce([1; 32]));
        let mut c = challenge(&ctl, &h.hello("test"), Nonce([2; 32]), "s1");
        if let AgentBound::Challenge { server_nonce, .. } = &mut c {
            *server_nonce = Nonce([3; 32]);
        }
        assert_eq!(h.on_challenge(c), Err(HandshakeError::BadChallenge));

        // A welcome signed by another key, or for another session.
        let mut h = AgentHandshake::new(&dev, &pinned, None, Nonce([1; 32]));
        let hello = h.hello("test");
        h.on_challenge(challenge(&ctl, &hello, Nonce([2; 32]), "s1")).expect("challenge");
        assert!(matches!(h.on_welcome(welcome(&other, &dev, "s1")), Err(HandshakeError::BadWelcome(_))));
        let mut h = AgentHandshake::new(&dev, &pinned, None, Nonce([1; 32]));
        let hello = h.hello("test");
        h.on_challenge(challenge(&ctl, &hello, Nonce([2; 32]), "s1")).expect("challenge");
        assert!(matches!(h.on_welcome(welcome(&ctl, &dev, "s2")), Err(HandshakeError::BadWelcome(_))));

        // Out of order, or refused.
        let h = AgentHandshake::new(&dev, &pinned, None, Nonce([1; 32]));
        assert!(matches!(h.on_welcome(welcome(&ctl, &dev, "s1")), Err(HandshakeError::Unexpected { .. })));
        let mut h = AgentHandshake::new(&dev, &pinned, None, Nonce([1; 32]));
        let refused = AgentBound::Refused { reason: "revoked".into() };
        assert_eq!(h.on_challenge(refused), Err(HandshakeError::Refused("revoked".into())));
    }
}
