// The benchmark's peer: npm oidc-provider (the certified OpenID provider the demo upstream also
// uses), configured like the Civitas hub for the measured requests:
//   * ES256 ID tokens; access tokens are JWTs (RFC 9068, ES256) through resource indicators,
//     for every client except those named in OPAQUE_CLIENTS (opaque tokens, which
//     oidc-provider requires for userinfo);
//   * authorization_code with PKCE S256 required, refresh_token with rotation on every use,
//     client_credentials (scope `api`, a JWT access token for the resource server, as the
//     hub's `consent.decisions`), client_secret_basic, introspection and revocation enabled;
//   * storage: an unbounded in-memory adapter (the default one is an LRU of 1,000 entries,
//     too small for codes minted ahead);
//   * sign-in: any interaction logs in `alice-0001` and grants what was asked, without a page
//     (the login is not what is measured; the hub's is also done once, ahead).
// Environment: CLIENTS (JSON array of {client_id, client_secret, redirect_uris}),
// OPAQUE_CLIENTS (JSON array of client ids). Prints `LISTENING <issuer>` when ready.
import * as crypto from 'node:crypto';
import * as http from 'node:http';

import Provider from '../demo/upstream/node_modules/oidc-provider/lib/index.js';
import { exportJWK, generateKeyPair } from '../demo/upstream/node_modules/jose/dist/webapi/index.js';

const CLIENTS = JSON.parse(process.env.CLIENTS || '[]');
const OPAQUE = new Set(JSON.parse(process.env.OPAQUE_CLIENTS || '[]'));
const RESOURCE = 'urn:civitas:bench:api';
const ACCOUNT = {
  sub: 'alice-0001', name: 'Alice Example', given_name: 'Alice', family_name: 'Example',
  email: 'alice@example.org', email_verified: true,
};

const stores = new Map();
const byGrant = new Map();
class MapAdapter {
  constructor(name) {
    this.name = name;
    if (!stores.has(name)) stores.set(name, new Map());
    this.store = stores.get(name);
  }
  async upsert(id, payload, expiresIn) {
    this.store.set(id, { payload, expires: expiresIn ? Date.now() + expiresIn * 1000 : 0 });
    if (payload.grantId) {
      if (!byGrant.has(payload.grantId)) byGrant.set(payload.grantId, []);
      byGrant.get(payload.grantId).push([this.name, id]);
    }
  }
  async find(id) {
    const entry = this.store.get(id);
    if (!entry) return undefined;
    if (entry.expires && entry.expires < Date.now()) { this.store.delete(id); return undefined; }
    return entry.payload;
  }
  async findByUid(uid) {
    for (const [id, entry] of this.store) if (entry.payload.uid === uid) return this.find(id);
    return undefined;
  }
  async findByUserCode() { return undefined; }
  async consume(id) {
    const entry = this.store.get(id);
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }
  async destroy(id) { this.store.delete(id); }
  async revokeByGrantId(grantId) {
    for (const [name, id] of byGrant.get(grantId) || []) stores.get(name)?.delete(id);
    byGrant.delete(grantId);
  }
}

async function main() {
  const server = http.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const { privateKey } = await generateKeyPair('ES256', { extractable: true });
  const jwk = { ...(await exportJWK(privateKey)), kid: 'es256-bench', alg: 'ES256', use: 'sig' };

  const provider = new Provider(issuer, {
    adapter: MapAdapter,
    clients: CLIENTS.map(({ client_id, client_secret, redirect_uris }) => ({
      client_id, client_secret, redirect_uris,
      grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
      response_types: ['code'],
      id_token_signed_response_alg: 'ES256',
      token_endpoint_auth_method: 'client_secret_basic',
    })),
    jwks: { keys: [jwk] },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    claims: {
      openid: ['sub'], profile: ['name', 'given_name', 'family_name'],
      email: ['email', 'email_verified'],
    },
    conformIdTokenClaims: false,
    responseTypes: ['code'],
    pkce: { required: () => true },
    rotateRefreshToken: true,
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      userinfo: { enabled: true },
      introspection: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: (ctx, client) => (OPAQUE.has(client.clientId) ? undefined : RESOURCE),
        useGrantedResource: () => true,
        getResourceServerInfo: () => ({
          scope: 'api', audience: RESOURCE, accessTokenFormat: 'jwt', accessTokenTTL: 3600,
          jwt: { sign: { alg: 'ES256' } },
        }),
      },
    },
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    async findAccount(ctx, sub) {
      if (sub !== ACCOUNT.sub) return undefined;
      return { accountId: sub, async claims() { return ACCOUNT; } };
    },
    ttl: {
      AccessToken: 3600, AuthorizationCode: 60, IdToken: 3600, Interaction: 3600,
      Session: 86400, Grant: 86400, RefreshToken: 86400,
    },
  });
  provider.proxy = false;
  const callback = provider.callback();

  server.on('request', async (req, res) => {
    if (!req.url.startsWith('/interaction/')) return callback(req, res);
    try {
      const details = await provider.interactionDetails(req, res);
      const { params } = details;
      let grant = details.grantId ? await provider.Grant.find(details.grantId) : undefined;
      grant ||= new provider.Grant({ accountId: ACCOUNT.sub, clientId: params.client_id });
      if (params.scope) grant.addOIDCScope(params.scope);
      if (!OPAQUE.has(params.client_id)) grant.addResourceScope(RESOURCE, 'api');
      const grantId = await grant.save();
      await provider.interactionFinished(req, res, {
        login: { accountId: ACCOUNT.sub }, consent: { grantId },
      }, { mergeWithLastSubmission: false });
    } catch (err) {
      res.statusCode = 400;
      res.end(String(err?.message || err));
    }
  });
  const shutdown = () => { server.close(() => process.exit(0)); server.closeAllConnections(); };
  process.once('SIGTERM', shutdown);
  process.once('SIGINT', shutdown);
  process.stdout.write(`LISTENING ${issuer}\n`);
}

main().catch((err) => { console.error('peer: failed to start', err); process.exit(1); });
