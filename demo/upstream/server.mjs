// Civitas demo / test upstream OpenID Provider.
//
// A real OP built on the `oidc-provider` package, used as the upstream
// identity provider of the demo and, in the test suite, as a third-party
// upstream that the hub federates with.
//
// Environment:
//   PORT          TCP port on 127.0.0.1 (0 = pick a free one; default 0)
//   ISSUER        issuer identifier (default http://127.0.0.1:$PORT, with the
//                 port actually bound)
//   CLIENTS       JSON array of {client_id, client_secret, redirect_uris, ...};
//                 any further keys are passed through as client metadata
//                 (e.g. token_endpoint_auth_method, post_logout_redirect_uris)
//   ID_TOKEN_ALG  RS256 (default) or ES256
//   USERS         optional JSON array replacing the built-in users:
//                 [{username, password, sub, <standard claims>...}]
//
// When ready it prints exactly one line `LISTENING <issuer>` to stdout.
// Everything is in memory (keys, sessions, grants): nothing is persisted.

import * as crypto from 'node:crypto';
import * as http from 'node:http';

import Provider from 'oidc-provider';
import { exportJWK, generateKeyPair } from 'jose';

// ---------------------------------------------------------------- settings

const DEFAULT_USERS = [
  {
    username: 'alice',
    password: 'alice-password',
    sub: 'alice-0001',
    name: 'Alice Example',
    given_name: 'Alice',
    family_name: 'Example',
    email: 'alice@example.org',
    email_verified: true,
  },
  {
    username: 'bob',
    password: 'bob-password',
    sub: 'bob-0002',
    name: 'Bob Sample',
    email: 'bob@example.org',
    email_verified: false,
  },
];

function fail(message) {
  console.error(`upstream-op: ${message}`);
  process.exit(2);
}

function jsonEnv(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  try {
    return JSON.parse(raw);
  } catch (err) {
    return fail(`${name} is not valid JSON: ${err.message}`);
  }
}

const PORT = Number.parseInt(process.env.PORT ?? '0', 10);
if (!Number.isInteger(PORT) || PORT < 0 || PORT > 65535) fail('PORT must be 0..65535');

const ID_TOKEN_ALG = process.env.ID_TOKEN_ALG || 'RS256';
if (!['RS256', 'ES256'].includes(ID_TOKEN_ALG)) fail('ID_TOKEN_ALG must be RS256 or ES256');

const CLIENTS = jsonEnv('CLIENTS', []);
if (!Array.isArray(CLIENTS)) fail('CLIENTS must be a JSON array');

const USERS = jsonEnv('USERS', DEFAULT_USERS);
if (!Array.isArray(USERS)) fail('USERS must be a JSON array');

const usersByName = new Map(USERS.map((u) => [u.username, u]));
const usersBySub = new Map(USERS.map((u) => [u.sub, u]));

// ---------------------------------------------------------------- helpers

const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ({
  '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
}[c]));

// Constant-time password comparison (hash first so lengths are equal).
function passwordMatches(given, expected) {
  const a = crypto.createHash('sha256').update(String(given)).digest();
  const b = crypto.createHash('sha256').update(String(expected)).digest();
  return crypto.timingSafeEqual(a, b);
}

// Reads an application/x-www-form-urlencoded body (capped at 64 KiB).
async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) throw Object.assign(new Error('body too large'), { status: 413 });
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${escapeHtml(title)}</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 24rem; margin: 3rem auto; padding: 0 1rem; }
  label { display: block; margin-top: 1rem; }
  input { display: block; width: 100%; box-sizing: border-box; padding: .4rem; }
  button { margin-top: 1.2rem; padding: .5rem 1.2rem; }
  .error { color: #a00; font-weight: bold; }
</style>
</head>
<body>
<main>
${body}
</main>
</body>
</html>`;
}

function send(res, status, html) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'text/html; charset=utf-8');
  res.setHeader('Cache-Control', 'no-store');
  res.end(html);
}

function loginPage(uid, clientId, { username = '', error = '' } = {}) {
  const uidPath = encodeURIComponent(uid);
  const alert = error ? `<p class="error" role="alert">${escapeHtml(error)}</p>` : '';
  return page('Sign in - Demo Upstream', `
<h1>Sign in to Demo Upstream</h1>
<p>Application <strong>${escapeHtml(clientId)}</strong> asks you to sign in.</p>
${alert}
<form method="post" action="/interaction/${uidPath}/login" autocomplete="off">
  <label for="username">Username</label>
  <input id="username" name="username" type="text" value="${escapeHtml(username)}" required autofocus>
  <label for="password">Password</label>
  <input id="password" name="password" type="password" required>
  <button type="submit">Sign in</button>
</form>
<p><a href="/interaction/${uidPath}/abort">Cancel</a></p>`);
}

// ---------------------------------------------------------------- keys

// Fresh signing key for every start; the kid lets relying parties pick it
// out of the JWKS (and notice a restart, since the kid changes).
async function makeSigningKey(alg) {
  const { privateKey } = await generateKeyPair(alg, { extractable: true });
  const jwk = await exportJWK(privateKey);
  jwk.kid = `${alg.toLowerCase()}-${crypto.randomBytes(8).toString('hex')}`;
  jwk.alg = alg;
  jwk.use = 'sig';
  return jwk;
}

// ---------------------------------------------------------------- provider

function buildProvider(issuer, signingJwk) {
  const clients = CLIENTS.map(({
    client_id: clientId, client_secret: clientSecret, redirect_uris: redirectUris, ...extra
  }) => ({
    client_id: clientId,
    client_secret: clientSecret,
    redirect_uris: redirectUris,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    id_token_signed_response_alg: ID_TOKEN_ALG,
    ...extra,
  }));

  const provider = new Provider(issuer, {
    clients,
    jwks: { keys: [signingJwk] },
    cookies: {
      // Default cookie names (_session, _interaction, _interaction_resume)
      // are kept; only the signing key is per-start random.
      keys: [crypto.randomBytes(32).toString('base64url')],
    },
    claims: {
      openid: ['sub'],
      profile: ['name', 'given_name', 'family_name'],
      email: ['email', 'email_verified'],
    },
    // Put the claims of the granted scopes into the ID token too (the
    // default only returns them from userinfo when an access token is issued).
    conformIdTokenClaims: false,
    responseTypes: ['code'],
    // PKCE for every client, confidential ones included. oidc-provider 9
    // only implements S256, so `plain` is rejected.
    pkce: { required: () => true },
    clientDefaults: {
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
      id_token_signed_response_alg: ID_TOKEN_ALG,
    },
    clientAuthMethods: ['client_secret_basic', 'client_secret_post'],
    features: {
      devInteractions: { enabled: false },
      userinfo: { enabled: true },
      rpInitiatedLogout: {
        enabled: true,
        logoutSource: async (ctx, form) => {
          ctx.body = page('Sign out - Demo Upstream', `
<h1>Sign out of Demo Upstream?</h1>
${form}
<button type="submit" form="op.logoutForm" value="yes" name="logout">Yes, sign me out</button>
<button type="submit" form="op.logoutForm">No, stay signed in</button>`);
        },
        postLogoutSuccessSource: async (ctx) => {
          ctx.body = page('Signed out - Demo Upstream', '<h1>You are signed out of Demo Upstream.</h1>');
        },
      },
    },
    interactions: {
      url: (ctx, interaction) => `/interaction/${interaction.uid}`,
    },
    // No browser CORS access is needed (the hub talks to us server-side).
    clientBasedCORS: () => false,
    async findAccount(ctx, sub) {
      const user = usersBySub.get(sub);
      if (!user) return undefined;
      return {
        accountId: sub,
        // oidc-provider filters these down to the granted scopes/claims.
        async claims() {
          const { username, password, ...claims } = user;
          return claims;
        },
      };
    },
    async renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('Error - Demo Upstream', `
<h1>Something went wrong</h1>
<dl>${Object.entries(out).map(([k, v]) => `<dt>${escapeHtml(k)}</dt><dd>${escapeHtml(v)}</dd>`).join('')}</dl>`);
    },
    // Explicit lifetimes (the defaults print a "you SHOULD change" notice).
    ttl: {
      AccessToken: 60 * 60,
      AuthorizationCode: 60,
      IdToken: 60 * 60,
      Interaction: 60 * 60,
      Session: 24 * 60 * 60,
      Grant: 24 * 60 * 60,
      RefreshToken: 24 * 60 * 60,
    },
  });

  // We are never behind a reverse proxy here: do not trust X-Forwarded-*.
  provider.proxy = false;
  return provider;
}

// ---------------------------------------------------------------- interactions

// Grants everything the authorization request asked for: the scopes in
// `scope` and the claim names in an optional `claims` request parameter.
async function grantAll(provider, details, accountId) {
  const { params, grantId } = details;
  let grant;
  if (grantId) {
    grant = await provider.Grant.find(grantId);
    if (grant && grant.accountId !== accountId) grant = undefined;
  }
  grant ||= new provider.Grant({ accountId, clientId: params.client_id });

  if (params.scope) grant.addOIDCScope(params.scope);
  if (params.claims) {
    try {
      const requested = JSON.parse(params.claims);
      const names = new Set([
        ...Object.keys(requested.id_token || {}),
        ...Object.keys(requested.userinfo || {}),
      ]);
      if (names.size) grant.addOIDCClaims([...names]);
    } catch {
      // Malformed `claims` is rejected by the provider before we get here.
    }
  }
  // Resource-server scopes (resource indicators) are not used by this OP.
  return grant.save();
}

async function handleInteraction(provider, req, res, url) {
  const match = url.pathname.match(/^\/interaction\/([^/]+)(\/login|\/abort)?\/?$/);
  if (!match) return send(res, 404, page('Not found', '<h1>Not found</h1>'));
  const [, uid, action] = match;

  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (err) {
    // SessionNotFound: cookie missing/expired or uid unknown.
    return send(res, 400, page('Sign-in expired', `
<h1>This sign-in request has expired</h1>
<p>${escapeHtml(err.error_description || err.message)}</p>
<p>Go back to the application and start again.</p>`));
  }
  if (details.uid !== uid) {
    return send(res, 400, page('Bad request', '<h1>Interaction mismatch</h1>'));
  }
  const { prompt, params, session } = details;
  const finish = (result) => provider.interactionFinished(req, res, result, {
    mergeWithLastSubmission: false,
  });

  if (action === '/abort' && req.method === 'GET') {
    return finish({ error: 'access_denied', error_description: 'End-User aborted interaction' });
  }

  // Already signed in, only consent missing: consent is automatic.
  if (prompt.name === 'consent' && session?.accountId) {
    const grantId = await grantAll(provider, details, session.accountId);
    return finish({ consent: { grantId } });
  }

  if (!action && req.method === 'GET') {
    return send(res, 200, loginPage(uid, params.client_id));
  }

  if (action === '/login' && req.method === 'POST') {
    const form = await readForm(req);
    const username = form.get('username') || '';
    const user = usersByName.get(username);
    if (!user || !passwordMatches(form.get('password') || '', user.password)) {
      return send(res, 401, loginPage(uid, params.client_id, {
        username, error: 'Wrong username or password',
      }));
    }
    const grantId = await grantAll(provider, details, user.sub);
    return finish({ login: { accountId: user.sub }, consent: { grantId } });
  }

  res.setHeader('Allow', action ? 'POST' : 'GET');
  return send(res, 405, page('Method not allowed', '<h1>Method not allowed</h1>'));
}

// ---------------------------------------------------------------- main

async function main() {
  const server = http.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(PORT, '127.0.0.1', resolve);
  });
  const { port } = server.address();
  // The issuer needs the bound port, so the provider is built after listen().
  const issuer = process.env.ISSUER || `http://127.0.0.1:${port}`;
  const provider = buildProvider(issuer, await makeSigningKey(ID_TOKEN_ALG));
  const callback = provider.callback();

  server.on('request', (req, res) => {
    const url = new URL(req.url, 'http://127.0.0.1');
    if (url.pathname.startsWith('/interaction/')) {
      handleInteraction(provider, req, res, url).catch((err) => {
        console.error('upstream-op: interaction error', err);
        if (!res.headersSent) send(res, err.status || 500, page('Error', '<h1>Internal error</h1>'));
        else res.end();
      });
    } else {
      callback(req, res);
    }
  });

  const shutdown = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
    // Belt and braces: never hang on shutdown.
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.once('SIGTERM', shutdown);
  process.once('SIGINT', shutdown);

  process.stdout.write(`LISTENING ${issuer}\n`);
}

main().catch((err) => {
  console.error('upstream-op: failed to start', err);
  process.exit(1);
});
