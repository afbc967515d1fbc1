import { z } from 'zod';
import { PUBLIC_KEY_LINE } from '../contract/requests';
import { Roles } from '../domain/roles';
import { isLoopback } from '../host-api/loopback';

const name = z.string({ error: 'must be a name (a string)' }).regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/, {
  error: 'must be 1 to 64 letters, digits, dots, dashes or underscores',
});

/** A host API server: https:// (mutual TLS, with the `tls` block), or http:// on this machine's loopback only. */
const httpUrl = z
  .url({ protocol: /^https?$/, error: 'must be an http:// or https:// URL' })
  .refine((url) => !URL.canParse(url) || new URL(url).protocol === 'https:' || isLoopback(new URL(url).hostname), {
    error:
      'must be https:// (the host API is served over mutual TLS); http:// only on a loopback address (127.0.0.0/8, ::1, localhost)',
  });

const filePath = z.string({ error: 'must be a file path' }).min(1, { error: 'must be a file path' });

/**
 * What the workers present to every host API server and trust of them (files; a relative path is relative to the
 * configuration file's directory): the site's CA certificate, and the client certificate and key (mode 0600) made
 * by `failover certs create`.
 */
const tlsSchema = z.strictObject({ ca: filePath, cert: filePath, key: filePath });

const hostSchema = z.strictObject({
  name,
  role: z.enum(['production', 'dr'], { error: "must be 'production' or 'dr'" }),
  /**
   * How the orchestrator reaches the host: the HTTP host API at `url`, served by the lab site (`lab`, which may
   * play every host) or by our host process on a KVM host (`kvm`, which serves that host alone).
   */
  adapter: z.strictObject({
    type: z.enum(['lab', 'kvm'], { error: "must be 'lab' or 'kvm'" }),
    url: httpUrl,
  }),
});

/** Only the lab site keeps backups so far. */
const backupRepositorySchema = z.strictObject({
  adapter: z.strictObject({
    type: z.literal('lab', { error: "must be 'lab' (the only backup repository shipped so far)" }),
    url: httpUrl,
  }),
});

const proxySchema = z.strictObject({
  name,
  /** One task is one VM disk being copied. */
  slots: z
    .number({ error: 'must be a number' })
    .int({ error: 'must be a whole number' })
    .min(1, { error: 'must be at least 1' })
    .max(64, { error: 'must be at most 64' }),
  /** Proxies can be taken offline by configuration; sessions then wait for the others. */
  enabled: z.boolean({ error: 'must be true or false' }).default(true),
  /**
   * How the proxy moves a running VM's blocks to the DR host. `network`: it reads them from the source host and
   * writes them to the DR host, so they pass through the proxy. `host-to-host`: it has the source host send them
   * straight to the DR host and only orders and watches the transfer (faster where the hosts support it).
   * Backups are always read through the proxy.
   */
  transport: z.enum(['network', 'host-to-host'], { error: "must be 'network' or 'host-to-host'" }).default('network'),
});

const scheduleSchema = z.strictObject({
  /** Runs the job every so often, e.g. "15m", "1h", "1d"; never 0. */
  every: z.string().regex(/^[1-9]\d*[smhd]$/, { error: 'must be a duration like 30m, 1h or 1d (not 0)' }),
});

const jobSchema = z.strictObject({
  name,
  /** Processed in this order when one lane handles them. */
  vms: z.array(name).min(1, { error: 'must list at least one VM' }),
  targetHost: name,
  proxies: z
    .union([z.literal('auto'), z.array(name).min(1)], { error: "must be 'auto' or a list of proxy names" })
    .default('auto'),
  restorePoints: z
    .number({ error: 'must be a number' })
    .int({ error: 'must be a whole number' })
    .min(1, { error: 'must be at least 1' })
    .max(28, { error: 'must be at most 28' })
    .default(7),
  dataSource: z.enum(['production', 'backup'], { error: "must be 'production' or 'backup'" }).default('production'),
  schedule: scheduleSchema.optional(),
});

const userSchema = z.strictObject({
  name,
  roles: z
    .array(z.enum(Roles, { error: `must be one of ${Roles.join(', ')}` }))
    .min(1, { error: 'must list at least one role' }),
  /**
   * The public keys whose signatures prove this user's requests (`failover keys create` prints the line); two while
   * a key is being replaced. A user without a key can make no request unless unsigned requests are allowed.
   */
  keys: z
    .array(
      z.string({ error: 'must be a public key line' }).regex(PUBLIC_KEY_LINE, {
        error:
          'must be an Ed25519 public key line like ed25519:<43 base64url characters>, as `failover keys create` prints it',
      }),
      { error: 'must be a list of public key lines' },
    )
    .max(4, { error: 'may list at most 4 keys' })
    .default([]),
});

/** How signed requests are judged. */
const requestsSchema = z.strictObject({
  /** How long after it was signed a request is still accepted (judged when its workflow received it). */
  validityMinutes: z
    .number({ error: 'must be a number' })
    .int({ error: 'must be a whole number' })
    .min(1, { error: 'must be at least 1' })
    .max(1440, { error: 'must be at most 1440' })
    .default(5),
  /**
   * For a lab-only setup: accept requests without a signature, on the name they give (still checked against the
   * users and their roles). Every request accepted that way is marked unsigned in its history and summary.
   */
  allowUnsigned: z.boolean({ error: 'must be true or false' }).default(false),
});

/**
 * Who scheduled job runs act as: a service identity, a configured user with BackupOperator or BackupAdministrator
 * and a public key, whose private key file (mode 0600; a relative path is relative to this file) the orchestration
 * worker reads to sign each job's schedule.
 */
const scheduledRunsSchema = z.strictObject({ requestedBy: name, key: filePath.optional() });

export const configurationSchema = z
  .strictObject({
    hosts: z.array(hostSchema).min(1, { error: 'must list at least one host' }),
    /** Where backup points are read for jobs whose data source is 'backup'. */
    backupRepository: backupRepositorySchema.optional(),
    proxies: z.array(proxySchema).min(1, { error: 'must list at least one proxy' }),
    jobs: z.array(jobSchema).default([]),
    users: z.array(userSchema).min(1, { error: 'must list at least one user' }),
    requests: requestsSchema.default({ validityMinutes: 5, allowUnsigned: false }),
    scheduledRuns: scheduledRunsSchema.optional(),
    tls: tlsSchema.optional(),
  })
  .superRefine((config, ctx) => {
    const https = [
      ...config.hosts.map((h, i) => ({ path: `hosts[${i}].adapter.url`, url: h.adapter.url })),
      ...(config.backupRepository
        ? [{ path: 'backupRepository.adapter.url', url: config.backupRepository.adapter.url }]
        : []),
    ].find((u) => u.url.startsWith('https:'));
    if (https && !config.tls)
      ctx.addIssue({
        code: 'custom',
        path: ['tls'],
        message: `is required: ${https.path} is https:// (give ca, cert and key: the site's CA, the client certificate and its key)`,
      });
    const unique = (items: { name: string }[], path: string) => {
      const seen = new Set<string>();
      items.forEach((item, i) => {
        if (seen.has(item.name))
          ctx.addIssue({ code: 'custom', path: [path, i, 'name'], message: `'${item.name}' is declared twice` });
        seen.add(item.name);
      });
    };
    unique(config.hosts, 'hosts');
    unique(config.proxies, 'proxies');
    unique(config.jobs, 'jobs');
    unique(config.users, 'users');
    const hosts = new Map(config.hosts.map((h) => [h.name, h]));
    const proxies = new Set(config.proxies.map((p) => p.name));
    const jobOfVm = new Map<string, string>();
    config.jobs.forEach((job, j) => {
      const target = hosts.get(job.targetHost);
      if (!target)
        ctx.addIssue({
          code: 'custom',
          path: ['jobs', j, 'targetHost'],
          message: `no host '${job.targetHost}' is declared`,
        });
      else if (target.role !== 'dr')
        ctx.addIssue({
          code: 'custom',
          path: ['jobs', j, 'targetHost'],
          message: `'${job.targetHost}' is not a DR host`,
        });
      if (job.proxies !== 'auto')
        job.proxies.forEach((p, k) => {
          if (!proxies.has(p))
            ctx.addIssue({ code: 'custom', path: ['jobs', j, 'proxies', k], message: `no proxy '${p}' is declared` });
        });
      job.vms.forEach((vm, k) => {
        const other = jobOfVm.get(vm);
        if (other !== undefined)
          ctx.addIssue({
            code: 'custom',
            path: ['jobs', j, 'vms', k],
            message: `'${vm}' is already replicated by job '${other}'`,
          });
        else jobOfVm.set(vm, job.name);
      });
      if (job.dataSource === 'backup' && !config.backupRepository)
        ctx.addIssue({ code: 'custom', path: ['jobs', j, 'dataSource'], message: "'backup' needs a backupRepository" });
      if (job.schedule && !config.scheduledRuns)
        ctx.addIssue({
          code: 'custom',
          path: ['jobs', j, 'schedule'],
          message: 'scheduled runs need a service identity: declare scheduledRuns with requestedBy and key',
        });
    });
    if (config.scheduledRuns) {
      const service = config.users.find((u) => u.name === config.scheduledRuns!.requestedBy);
      const problem = !service
        ? `no user '${config.scheduledRuns.requestedBy}' is declared`
        : !service.roles.some((r) => r === 'BackupAdministrator' || r === 'BackupOperator')
          ? `'${service.name}' must hold BackupOperator or BackupAdministrator to run jobs`
          : service.keys.length === 0 && !config.requests.allowUnsigned
            ? `'${service.name}' has no key: list the public key of the service identity's key file`
            : null;
      if (problem) ctx.addIssue({ code: 'custom', path: ['scheduledRuns', 'requestedBy'], message: problem });
      if (!config.scheduledRuns.key && !config.requests.allowUnsigned)
        ctx.addIssue({
          code: 'custom',
          path: ['scheduledRuns', 'key'],
          message: 'is required: scheduled runs are signed (unless requests.allowUnsigned)',
        });
    }
  });

export type Configuration = z.output<typeof configurationSchema>;
export type HostConfig = Configuration['hosts'][number];
export type JobConfig = Configuration['jobs'][number];
export type ProxyConfig = Configuration['proxies'][number];
export type ProxyTransport = ProxyConfig['transport'];
export type UserConfig = Configuration['users'][number];
